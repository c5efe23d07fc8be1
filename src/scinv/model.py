"""User-facing inVAE model: setup from AnnData, train, latents, invariant predictor, save/load, query mapping.

Example::

    model = InVAE(adata, layer="counts", batch_key="batch", label_key="cell_type")
    model.train(max_epochs=200)
    adata.obsm["X_scinv_inv"] = model.get_latent_representation(adata, "inv")
    model.train_predictor()
    labels, probs = model.predict(adata)
    model.save("model_dir")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ModelConfig, PredictorConfig, TrainingConfig
from .data import UNKNOWN_LABEL, DataRegistry, EncodedData, MinibatchLoader, split_train_validation
from .errors import ScinvInputError
from .mapping import REFERENCE_SAMPLE_CELLS, ReferenceSample, calibrate_threshold, novelty_scores, reference_umap
from .module import InVAEModule, InvariantClassifier, invariant_risk
from .training import EarlyStopping, Trainer, keep_freed_memory_for_reuse, progress, resolve_device, seed_everything

MODEL_FORMAT = 1
# hyperparameters added after format 1, with the behaviour of models saved before them
HPARAMS_BEFORE_THEY_EXISTED = {
    "kl_inv_weight": 1.0,
    "kl_spur_weight": 1.0,
    "classifier_weight": 0.0,
    "invariance_weight": 0.0,
    "invariance_on_unlabelled": False,
    "invariance_confidence": 0.0,  # unlabelled cells weighed by soft probabilities
    "invariance_kernel": "mean",
    "prior_family": "gaussian",
    "label_prior": "frequency",
    "input_thinning": 0.0,
    "dispersion": "gene",
}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
REPRESENTATIONS = ("inv", "spur", "full")
DEFAULT_KL_WARMUP_EPOCHS = 20  # a first train(); a continuing one warms up for 0 epochs


def _make_config(cls, options: dict, what: str):
    """`cls(**options)`, with an unknown keyword named (and the class that lists the valid ones)."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown {what}(s) {unknown}; the valid ones are the fields of scinv.config.{cls.__name__}: {sorted(valid)}")
    return cls(**options)


def read_model_config(path: str | os.PathLike) -> dict:
    """config.json of a saved model directory; a clear error when `path` is not one (or another format)."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists() or not weights.exists():
        raise ScinvInputError(
            f"{path}: not a scinv model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); pass the model folder a scinv run wrote (model/<run>_model)"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ScinvInputError(f"{cfg_file}: not valid JSON ({err.msg}); the model directory is damaged") from err
    if config.get("format") != MODEL_FORMAT:
        raise ScinvInputError(
            f"{path}: model format {config.get('format')} (scinv {config.get('scinv_version')}) is not supported "
            f"by scinv {__version__} (format {MODEL_FORMAT}); retrain or use the matching scinv version"
        )
    return config


def model_genes(path: str | os.PathLike) -> list[str]:
    """The genes (in order) of the saved model at `path`, without loading its weights."""
    return list(read_model_config(path)["registry"]["var_names"])


class InVAE:
    """Conditionally invariant VAE with an invariant label predictor.

    Parameters
    ----------
    adata
        Training data with raw counts in `layer` (or X).
    batch_key
        Batch column: the environments, and the first technical covariate of the spurious prior.
    label_key
        Label column (e.g. cell type): the first biological covariate of the invariant prior and
        the target of the predictor. Cells with `unknown_label` use the label-marginal prior (see
        `label_prior`).
    invariant_keys, spurious_keys
        Extra biological / technical obs columns for the two priors; `continuous_keys` lists those
        to treat as continuous.
    **model_options
        The fields of :class:`scinv.config.ModelConfig` (each documented there), e.g.
        n_latent_inv, n_latent_spur, n_hidden, n_layers, dropout, batch_norm: the architecture
        (encoder and decoder both use n_layers hidden layers of n_hidden units).
    prior_mode
        'mean' (learned mean, unit variance), 'variance' (zero mean, learned variance) or 'both'.
    encode_covariates, covariate_dropout
        If True the encoder also sees the technical covariates (batch, ...), never the labels;
        during training they are hidden for a `covariate_dropout` fraction of cells, so that
        cells of unseen batches can be encoded as "batch unknown". Default False: the encoder
        reads counts only, so query cells need no covariates at all.
    prior_family
        'gaussian' (the conditional Gaussian priors above) or 'nf' (NFinVAE: a non-factorised
        exponential-family prior for z_inv fitted by score matching with the exact Hessian
        diagonal; `prior_mode` then applies to the spurious prior only; reported kl_inv is up to
        the prior's log-normaliser).
    kl_inv_weight
        Weight of the invariant latent's KL term (beta). Below 1, z_inv keeps variation within each
        label instead of collapsing onto the label prior's means on the training cells.
    kl_spur_weight
        Weight of the spurious latent's KL term; default: kl_inv_weight. Lighter on z_inv alone,
        z_inv would be the cheaper place for batch effects and z_spur would go unused.
    invariance_kernel, invariance_weight
        The penalty on batch differences of z_inv within each label (labelled cells, and confident
        pseudo-labels of unlabelled ones): the invariant prior assumes z_inv independent of the
        batch given the label, and the ELBO alone does not enforce it. 'mmd' (default, weight 300:
        :meth:`scinv.module.InVAEModule.batch_invariance_mmd`, the whole distribution) or 'mean'
        (weight 10: :meth:`scinv.module.InVAEModule.batch_invariance`, the means only).
    label_prior
        Mixture weights over labels of the prior of cells without a label: 'uniform' (default, as
        scANVI's label prior) or 'frequency' (the labelled cells' label frequencies, which impose the
        reference's composition on an unlabelled batch and pull its cells towards common labels).
    classifier_weight
        Weight of an auxiliary classifier of the labels from z_inv trained jointly (labels are
        targets, never encoder inputs). Without it the invariant latent can collapse when the
        counts carry weak type signal (measured: within-reference kNN 0.19 -> 0.99).
    """

    def __init__(
        self,
        adata=None,
        layer: str | None = None,
        batch_key: str | None = None,
        label_key: str | None = None,
        unknown_label: str = UNKNOWN_LABEL,
        invariant_keys: Sequence[str] = (),
        spurious_keys: Sequence[str] = (),
        continuous_keys: Sequence[str] = (),
        *,
        _registry: DataRegistry | None = None,
        _where: str = "AnnData",
        **model_options,
    ):
        self.config = _make_config(ModelConfig, model_options, "model option")
        self.registry = _registry or DataRegistry.from_anndata(
            adata, layer, batch_key, label_key, unknown_label, invariant_keys, spurious_keys, continuous_keys, _where
        )
        self.hparams = asdict(self.config)  # saved with the model; _build_module reads it
        self.adata = adata
        self._data: EncodedData | None = self.registry.encode(adata, _where) if adata is not None else None
        if self._data is not None:
            from .io import check_counts

            X = self._data.X  # in memory, or a backed dataset: check its first rows
            check_counts(X if sp.issparse(X) else X[: min(adata.n_obs, 2000)], _where)
        self.module = self._build_module(self._label_frequencies())
        self.predictor: InvariantClassifier | None = None
        self.history: list[dict] = []
        self.predictor_history: list[dict] = []
        self.mapped_query = False  # set by map_query: train() would move the frozen reference weights
        self.reference: ReferenceSample | None = None  # set by store_reference; query mapping needs it
        self._validation_cells: np.ndarray | None = None  # cells the last train() held out of its gradient steps
        self.device = torch.device("cpu")

    # -- construction helpers -------------------------------------------------------------------------
    def _label_frequencies(self) -> torch.Tensor | None:
        """Mixture weights of the label-marginal prior (K,); None: uniform (InVAEModule's default)."""
        if self._data is None or self.registry.n_labels == 0 or self.hparams["label_prior"] == "uniform":
            return None
        labels = self._data.labels[self._data.labels >= 0]
        counts = np.bincount(labels, minlength=self.registry.n_labels).astype(np.float32) + 1.0
        return torch.from_numpy(counts / counts.sum())

    def _build_module(self, label_frequencies=None) -> InVAEModule:
        h = self.hparams
        if h["dispersion"] == "gene-batch" and self.registry.batch is None:
            raise ScinvInputError("dispersion 'gene-batch' needs a batch_key (one dispersion per gene and batch); set one, or use 'gene'")
        return InVAEModule(
            n_genes=len(self.registry.var_names),
            n_labels=self.registry.n_labels,
            n_inv_covariates=self.registry.inv_width,
            n_spur_covariates=self.registry.spur_width,
            n_latent_inv=h["n_latent_inv"],
            n_latent_spur=h["n_latent_spur"],
            n_hidden=h["n_hidden"],
            n_layers=h["n_layers"],
            dropout=h["dropout"],
            batch_norm=h["batch_norm"],
            prior_mode=h["prior_mode"],
            kl_estimator=h["kl_estimator"],
            kl_inv_weight=h["kl_inv_weight"],
            kl_spur_weight=h["kl_spur_weight"],
            tc_weight=h["tc_weight"],
            label_frequencies=label_frequencies,
            encode_covariates=h["encode_covariates"],
            covariate_dropout=h["covariate_dropout"],
            classifier_weight=h["classifier_weight"],
            invariance_weight=h["invariance_weight"],
            invariance_on_unlabelled=h["invariance_on_unlabelled"],
            invariance_confidence=h["invariance_confidence"],
            invariance_kernel=h["invariance_kernel"],
            prior_family=h["prior_family"],
            input_thinning=h["input_thinning"],
            dispersion=h["dispersion"],
            n_batches=self.registry.batch.width if self.registry.batch else 0,
        )

    @property
    def var_names(self) -> list[str]:
        return list(self.registry.var_names)

    def _training_data(self) -> EncodedData:
        if self._data is None:
            raise ScinvInputError("no data: pass an AnnData (the model was loaded without training data)")
        return self._data

    # -- training -------------------------------------------------------------------------------------
    def train(self, *, device: str | None = "auto", resume: bool = True, **training_options) -> list[dict]:
        """Train the VAE. Returns the per-epoch history (train/validation loss per term, lr, seconds).

        The first call starts from fresh weights drawn with `seed`. A later call continues from the
        current weights, as in scvi-tools, for up to `max_epochs` more epochs, and appends to the
        history. `kl_warmup_epochs` defaults to 20 on the first call and 0 when continuing. A model
        made by :meth:`map_query` refuses `train()`: its reference weights stay frozen.
        `training_options` are the fields of :class:`scinv.config.TrainingConfig` (max_epochs,
        batch_size, lr, seed, ...). With `checkpoint_dir` the full state (weights, optimiser,
        scheduler, RNG, epoch) is saved every `checkpoint_every` epochs, and a new call with
        `resume` continues from it.
        """
        if self._data is None:
            raise ScinvInputError("this model has no training data; create it from an AnnData to train")
        if self.mapped_query:
            raise ScinvInputError(
                "this model was made by map_query and keeps the reference weights frozen; "
                "train its query part with map_query(query, max_epochs=...) on the reference model instead"
            )
        continuing = bool(self.history)
        config = _make_config(TrainingConfig, training_options, "training option")
        if config.kl_warmup_epochs is None:
            config.kl_warmup_epochs = 0 if continuing else DEFAULT_KL_WARMUP_EPOCHS
        self.device = resolve_device(device)
        seed_everything(config.seed)
        if continuing:
            progress(f"continuing training from the current weights (after {len(self.history)} epochs)")
        else:
            self.module = self._build_module(self._label_frequencies())
        trainer = Trainer(self.module, self._data, config, self.device)
        done = len(self.history) if continuing else 0
        new = [{**record, "epoch": record["epoch"] + done} for record in trainer.fit(config.checkpoint_dir, resume)]
        self.history = (self.history if continuing else []) + new
        self.train_config = asdict(trainer.config)  # max_epochs as resolved
        self._validation_cells = trainer.val_idx
        return self.history

    def store_reference(self, max_cells: int = REFERENCE_SAMPLE_CELLS, seed: int = 0, umap: bool = True) -> ReferenceSample:
        """Keep z_inv of up to `max_cells` training cells, their batch and label, a UMAP and the novelty threshold.

        Saved with the model, so that a query mapped later gets novelty scores and a place on the
        reference UMAP without the reference data (see :mod:`scinv.mapping`). Call after train().
        """
        data = self._training_data()
        rng = np.random.default_rng(seed)
        cells = np.arange(data.n_cells) if data.n_cells <= max_cells else np.sort(rng.choice(data.n_cells, max_cells, replace=False))
        validation = self._validation_cells if self._validation_cells is not None and len(self._validation_cells) else cells
        calibration = np.flatnonzero(np.isin(cells, validation))
        subset = EncodedData(data.X[cells], data.inv_covariates[cells], data.spur_covariates[cells], data.labels[cells], data.environments[cells])
        latent = self._posterior(subset)[0][:, : self.hparams["n_latent_inv"]].numpy()
        reg = self.registry
        batches = np.asarray(reg.batch.categories, dtype=object)[subset.environments] if reg.batch else np.full(len(cells), "all", dtype=object)
        labels = np.where(subset.labels >= 0, np.asarray(reg.labels + [""], dtype=object)[subset.labels], reg.unknown_label)
        index = self.adata.obs_names[cells] if self.adata is not None else pd.RangeIndex(len(cells)).astype(str)
        obs = pd.DataFrame({"batch": batches, "label": labels}, index=index)
        known = np.where(subset.labels >= 0, labels, "").astype(str)
        calibration = calibrate_threshold(latent, obs["batch"].to_numpy(), calibration, known)
        calibration["sample_cells"] = int(len(cells))
        self.reference = ReferenceSample(latent, obs, reference_umap(latent, seed) if umap else None, calibration)
        progress(
            f"reference sample: {len(cells):,} cells; novelty threshold {calibration['threshold']:.3f} "
            f"({calibration['quantile']:.0%} of {calibration['calibration_cells']:,} held-out cells scored against the other batches)"
        )
        return self.reference

    def novelty(self, adata=None, latent: np.ndarray | None = None) -> np.ndarray:
        """(n_cells,) novelty scores: mean z_inv distance to the nearest reference cells (:mod:`scinv.mapping`).

        Cells above `model.reference.threshold` are unlike every reference cell: a type the reference lacked.
        """
        if self.reference is None:
            raise ScinvInputError("the model has no reference sample: call store_reference() after train() (TRAIN does)")
        z = self.get_latent_representation(adata, "inv") if latent is None else latent
        return novelty_scores(self.reference.latent, z)

    # -- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def get_latent_representation(self, adata=None, representation: str = "inv", batch_size: int = 2048, sample: bool = False) -> np.ndarray:
        """Posterior means (n_cells, D_rep) for 'inv' (D_inv), 'spur' (D_spur) or 'full' (D).

        Labels never change the latent; technical covariates do only with encode_covariates=True.
        """
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}")
        mean, var = self._posterior(self._encoded_counts_only(adata), batch_size)
        z = (mean + var.sqrt() * torch.randn_like(mean) if sample else mean).numpy()
        d = self.hparams["n_latent_inv"]
        return {"inv": z[:, :d], "spur": z[:, d:], "full": z}[representation]

    def _encoded_counts_only(self, adata) -> EncodedData:
        if adata is None:
            return self._training_data()
        self.registry.check_genes(adata, "AnnData")
        n = adata.n_obs
        spur, unseen = self.registry.encode_encoder_covariates(adata.obs, "AnnData")
        if unseen:
            warnings.warn(
                f"technical covariates not seen in training {unseen[:5]}: those cells are encoded as 'batch unknown'; "
                "use map_query to adapt the model to new batches",
                stacklevel=3,
            )
        empty = np.zeros((n, 0), np.float32)
        neg = np.full(n, -1, np.int64)
        return EncodedData(self.registry.counts(adata), empty, spur, neg, np.zeros(n, np.int64))

    # -- invariant predictor -------------------------------------------------------------------------
    def train_predictor(self, **predictor_options) -> list[dict]:
        """Fit the label classifier on z_inv of the labelled training cells, across environments.

        The objective is environment-balanced ERM (each batch weighs the same), plus the IRMv1
        penalty when `irm_weight` > 0. Each epoch draws fresh posterior samples of z_inv
        (`n_samples` per cell) as augmentation; validation uses posterior means.
        `predictor_options` are the fields of :class:`scinv.config.PredictorConfig`.
        """
        c = _make_config(PredictorConfig, predictor_options, "predictor option")
        max_epochs, batch_size, lr, irm_weight, n_samples, seed = c.max_epochs, c.batch_size, c.lr, c.irm_weight, c.n_samples, c.seed
        if self.registry.n_labels < 2:
            raise ScinvInputError("the predictor needs a label_key with at least two known labels")
        data = self._training_data()
        seed_everything(seed)
        mean, var = (t[:, : self.hparams["n_latent_inv"]] for t in self._posterior(data))
        labelled = np.flatnonzero(data.labels >= 0)
        train_idx, val_idx = split_train_validation(len(labelled), 0.1, seed)
        train_idx, val_idx = labelled[train_idx], labelled[val_idx]
        y = torch.from_numpy(data.labels)
        env = torch.from_numpy(data.environments)
        n_env = self.registry.n_batches
        d = self.hparams["n_latent_inv"]
        self.predictor = InvariantClassifier(d, self.registry.n_labels, self.hparams["predictor_hidden"])
        opt = torch.optim.AdamW(self.predictor.parameters(), lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        stopping, history = EarlyStopping(c.early_stopping_patience, min_delta=1e-4), []
        for epoch in range(max_epochs):
            self.predictor.train()
            order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
            order = order.repeat(n_samples)
            total, penalty_total = 0.0, 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                z = mean[idx] + var[idx].sqrt() * torch.randn(len(idx), d, generator=gen)
                obj, pen = invariant_risk(self.predictor(z), y[idx], env[idx], n_env, irm_weight)
                opt.zero_grad()
                obj.backward()
                opt.step()
                total += float(obj.detach()) * len(idx)
                penalty_total += float(pen.detach()) * len(idx)
            val = self._predictor_validation(mean, y, env, val_idx if len(val_idx) else train_idx, n_env)
            history.append({"epoch": epoch + 1, "train_objective": total / len(order), "irm_penalty": penalty_total / len(order), **val})
            if stopping.update(val["validation_risk"], lambda: {k: v.clone() for k, v in self.predictor.state_dict().items()}):
                break
        if stopping.best_state is not None:
            self.predictor.load_state_dict(stopping.best_state)
        self.predictor.eval()
        self.predictor_history = history
        last = history[-1]
        progress(f"predictor: {len(history)} epochs, validation accuracy {last['validation_accuracy']:.3f} (balanced over batches)")
        return history

    @torch.no_grad()
    def _predictor_validation(self, mean, y, env, idx, n_env) -> dict:
        self.predictor.eval()
        idx = torch.from_numpy(idx)
        logits = self.predictor(mean[idx])
        obj, _ = invariant_risk(logits, y[idx], env[idx], n_env, 0.0)
        acc = (logits.argmax(1) == y[idx]).float().mean()
        return {"validation_risk": float(obj), "validation_accuracy": float(acc)}

    @torch.no_grad()
    def _posterior(self, data: EncodedData, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and variances (n_cells, D) on the CPU, encoded in minibatches."""
        self.module.eval().to(self.device)
        keep_freed_memory_for_reuse()
        n_latent = self.hparams["n_latent_inv"] + self.hparams["n_latent_spur"]
        means, variances = torch.empty(data.n_cells, n_latent), torch.empty(data.n_cells, n_latent)  # filled in place: flat memory
        start = 0
        for batch in MinibatchLoader(data, batch_size=batch_size, shuffle=False, device=self.device, likelihood_terms=False):
            qm, qv = self.module.encoder(batch["x_log"], batch["spur"])
            means[start : start + len(qm)], variances[start : start + len(qm)] = qm.float().cpu(), qv.float().cpu()
            start += len(qm)
        return means, variances

    @torch.no_grad()
    def predict(self, adata=None, batch_size: int = 4096) -> tuple[np.ndarray, pd.DataFrame]:
        """Predicted labels (n_cells,) and class probabilities (n_cells, K) from z_inv posterior means."""
        if self.predictor is None:
            raise ScinvInputError("no predictor: call train_predictor() first (it needs a label_key)")
        z = torch.from_numpy(self.get_latent_representation(adata, "inv", batch_size))
        self.predictor.eval()
        probs = torch.cat([torch.softmax(self.predictor(z[i : i + batch_size]), -1) for i in range(0, len(z), batch_size)])
        probs = probs.numpy()
        labels = np.asarray(self.registry.labels, dtype=object)[probs.argmax(1)]
        index = adata.obs_names if adata is not None else (self.adata.obs_names if self.adata is not None else None)
        return labels, pd.DataFrame(probs, columns=self.registry.labels, index=index)

    # -- query mapping ----------------------------------------------------------------------------------
    def map_query(
        self,
        query,
        max_epochs: int = 50,
        batch_size: int = 256,
        lr: float = 1e-3,
        fine_tune_encoder: bool = False,
        seed: int = 0,
        device: str | None = "auto",
        use_labels: bool = False,
    ) -> InVAE:
        """Return a copy of the model extended to the new batches of `query` (scArches-style surgery).

        The batch category map gains the query's new batches and the spurious prior's first layer
        gains input columns for them; only those columns are trained on the query (plus the encoder
        when `fine_tune_encoder`, and with dispersion 'gene-batch' the new batches' dispersions, which
        start at the reference batches' mean). Decoder, reference dispersions and invariant prior stay frozen, so z_inv keeps
        its meaning and, with the encoder frozen, reference latents are unchanged. The query's labels
        are not used unless `use_labels` (they may hold types the reference lacks, and are what
        transfer is scored against). The reference sample is carried over for novelty scores.
        """
        reg = self.registry
        if reg.batch is None:
            raise ScinvInputError("map_query needs a model trained with a batch_key")
        if reg.batch.key not in query.obs.columns:
            raise ScinvInputError(f"query: batch column '{reg.batch.key}' not found in obs; add it")
        new = sorted(set(query.obs[reg.batch.key].astype(str)) - set(reg.batch.categories))
        query_model = InVAE.from_state(self._config(), self._state_dict())
        query_model.device = resolve_device(device)
        query_model._extend_batches(new)
        query_model.mapped_query = True
        query_model.adata = query
        query_model.reference = self.reference
        query_model._data = query_model.registry.encode(query, "query", use_labels=use_labels)
        # on the training device before the gradient masks are made, so masks and gradients share it
        module = query_model.module.to(query_model.device)
        for p in module.parameters():
            p.requires_grad_(False)
        trainable = list(module.encoder.parameters()) if fine_tune_encoder else []
        n_old = reg.batch.width  # self's registry: the reference batches only
        prior_input = module.prior_spur.net[0] if module.prior_spur.net is not None else None
        new_columns = [layer for layer in (prior_input, module.encoder.covariates) if layer is not None]

        def train_only(param: torch.nn.Parameter, new_part: tuple) -> None:
            """Train `param[new_part]` (the new batches' slice) and leave the rest as it is."""
            mask = torch.zeros_like(param)
            mask[new_part] = 1.0
            param.requires_grad_(True)
            param.register_hook(lambda g, mask=mask: g * mask)
            if not any(param is p for p in trainable):
                trainable.append(param)

        new_batches = slice(n_old, n_old + len(new))
        for layer in new_columns if new else []:
            train_only(layer.weight, (slice(None), new_batches))  # input columns
        if new and module.log_theta_batch is not None:
            train_only(module.log_theta_batch, (new_batches,))  # rows: one per batch
        if trainable:
            for p in trainable:
                p.requires_grad_(True)
            config = TrainingConfig(
                max_epochs=max_epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, kl_warmup_epochs=0, seed=seed, early_stopping_patience=10, lr_factor=0.1
            )
            frozen = [module.decoder] + ([] if fine_tune_encoder else [module.encoder])
            trainer = Trainer(module, query_model._data, config, query_model.device, frozen=frozen, parameters=trainable)
            query_model.history = trainer.fit()
        for p in module.parameters():
            p.requires_grad_(True)
        module.eval()
        return query_model

    def _extend_batches(self, new: list[str]) -> None:
        """Insert columns for new batches after the old batch columns of the spurious prior input."""
        reg = self.registry
        n_old_batches = reg.batch.width
        reg.batch.categories = reg.batch.categories + new
        if not new:
            return

        def widen(old: torch.nn.Linear, init: str) -> torch.nn.Linear:
            layer = torch.nn.Linear(old.in_features + len(new), old.out_features, bias=old.bias is not None)
            with torch.no_grad():
                w = old.weight
                fill = (w[:, :n_old_batches].mean(1, keepdim=True) if init == "mean" else torch.zeros_like(w[:, :1])).expand(-1, len(new))
                layer.weight.copy_(torch.cat([w[:, :n_old_batches], fill, w[:, n_old_batches:]], dim=1))
                if old.bias is not None:
                    layer.bias.copy_(old.bias)
            return layer

        prior = self.module.prior_spur
        if prior.net is not None:
            prior.net[0] = widen(prior.net[0], "mean")
            prior.n_covariates += len(new)
        if self.module.encoder.covariates is not None:
            # zeros: a new batch starts as "batch unknown", which the encoder was trained for
            self.module.encoder.covariates = widen(self.module.encoder.covariates, "zero")
        if self.module.log_theta_batch is not None:
            old = self.module.log_theta_batch.data
            self.module.log_theta_batch = torch.nn.Parameter(torch.cat([old, old.mean(0, keepdim=True).expand(len(new), -1)]))
            self.module.n_batches += len(new)

    # -- persistence --------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "scinv_version": __version__,
            "hparams": self.hparams,
            "registry": self.registry.to_dict(),
            "train_config": getattr(self, "train_config", None),
            "has_predictor": self.predictor is not None,
            "history": self.history,
            "predictor_history": self.predictor_history,
            "mapped_query": self.mapped_query,
            "reference": self.reference.calibration if self.reference is not None else None,
        }

    def _state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        if self.predictor is not None:
            state.update({f"predictor.{k}": v.detach().cpu().contiguous() for k, v in self.predictor.state_dict().items()})
        return state

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        """Write `model.safetensors` (weights) and `config.json` (hyperparameters, category maps, history).

        The directory is assembled under a temporary name and renamed, so it is never half-written.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(self._state_dict(), tmp / WEIGHTS_FILE)
            if self.reference is not None:
                self.reference.save(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(self._config(), indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> InVAE:
        # a model saved before an option existed trained without it: its missing keys get that
        # behaviour, not today's default (which may differ, e.g. invariance_kernel since session 19)
        hparams = {**HPARAMS_BEFORE_THEY_EXISTED, **config["hparams"]}
        model = cls(_registry=DataRegistry.from_dict(config["registry"]), **hparams)
        module_state = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
        model.module.load_state_dict(module_state)
        model.module.eval()
        if config.get("has_predictor"):
            h = model.hparams
            model.predictor = InvariantClassifier(h["n_latent_inv"], model.registry.n_labels, h["predictor_hidden"])
            model.predictor.load_state_dict({k[len("predictor.") :]: v for k, v in state.items() if k.startswith("predictor.")})
            model.predictor.eval()
        model.history = config.get("history", [])
        model.predictor_history = config.get("predictor_history", [])
        model.train_config = config.get("train_config")
        model.mapped_query = bool(config.get("mapped_query", False))
        return model

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = "cpu") -> InVAE:
        """Load a saved model; needs no training data. Raises a clear error for other formats."""
        path = Path(path)
        config = read_model_config(path)
        model = cls.from_state(config, load_file(path / WEIGHTS_FILE))
        if config.get("reference"):
            model.reference = ReferenceSample.load(path, config["reference"])
        model.device = resolve_device(device)
        return model
