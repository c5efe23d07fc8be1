"""The torch parts of inVAE, by concern; :mod:`scinv.module` assembles them into :class:`InVAEModule`
and re-exports every name, so import from there.

- :mod:`.fastmath`: the ``SCINV_PLAIN_MATH`` switch and the small speed tricks shared by the others;
- :mod:`.layers`: gene-wide linear layer, dropout, hidden stacks, encoder and decoder;
- :mod:`.gaussian`: Gaussian densities and KLs, and the fused posterior / sample / KL kernel;
- :mod:`.nb`: the negative binomial likelihood and its two fused kernels;
- :mod:`.priors`: the conditional priors of z_inv and z_spur, and score matching;
- :mod:`.predictor`: the label classifier on z_inv and the invariant risk (ERM + IRMv1).

Each fused kernel (a hand-written ``torch.autograd.Function``) has a plain autograd twin next to it,
``<name>_plain``, that computes the same thing; ``SCINV_PLAIN_MATH=1`` selects the twins
(see :mod:`.fastmath`).
"""
