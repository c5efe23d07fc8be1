"""scinv: conditionally invariant VAE (inVAE) for single-cell data integration."""

__version__ = "0.1.0"
__all__ = ["InVAE", "__version__"]


def __getattr__(name):  # lazy, so that `import scinv.io` does not pay for torch
    if name == "InVAE":
        from .model import InVAE

        return InVAE
    raise AttributeError(name)
