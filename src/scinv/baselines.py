"""Reference integrations scored next to scinv: Harmony (harmonypy), scVI and scANVI (scvi-tools).

Each returns a (cells x dims) float32 embedding in the row order of the input AnnData, which is the
normalised HVG object the inVAE model trains on (raw counts in layers['counts'], PCA in obsm).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd

from .errors import ScinvInputError
from .labels import normalize_labels

log = logging.getLogger("scinv")
METHODS = ("harmony", "scvi", "scanvi")
SCANVI_LABELS = "_scinv_label"  # obs column of the labels scANVI trains on


def _check_batches(adata: ad.AnnData, batch_key: str, method: str) -> None:
    if batch_key not in adata.obs.columns:
        raise ScinvInputError(f"{method}: obs column '{batch_key}' not found; fix batch_key")
    if adata.obs[batch_key].nunique() < 2:
        raise ScinvInputError(f"{method}: only one batch in '{batch_key}'; a batch correction needs two or more")


def harmony_embedding(adata: ad.AnnData, batch_key: str, use_rep: str = "X_pca", seed: int = 0, threads: int = 0) -> np.ndarray:
    """Harmony on `obsm[use_rep]` (cells x PCs) -> corrected PCs, shape (cells, PCs)."""
    import harmonypy

    _check_batches(adata, batch_key, "harmony")
    if use_rep not in adata.obsm:
        raise ScinvInputError(f"harmony: obsm['{use_rep}'] not found; run the NORMALIZE step (it computes the PCA) first")
    pcs = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    meta = adata.obs[[batch_key]].astype(str)
    ho = harmonypy.run_harmony(pcs, meta, batch_key, random_state=seed, ncores=threads, verbose=False)
    z = np.asarray(ho.Z_corr)
    return (z if z.shape[0] == adata.n_obs else z.T).astype(np.float32)


def _epoch_logger():
    """A Lightning callback that logs epoch, ELBO and ETA (the progress bar is useless in a task log)."""
    import time

    from lightning.pytorch.callbacks import Callback

    class EpochLogger(Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            done, total = trainer.current_epoch + 1, trainer.max_epochs
            if done % 10 and done != total:
                return
            elbo = trainer.callback_metrics.get("elbo_train")
            eta = (time.perf_counter() - self.start) / done * (total - done)
            log.info("scvi: epoch %d/%d elbo_train %.2f ETA %.0f s", done, total, float(elbo) if elbo is not None else float("nan"), eta)

    return EpochLogger()


def train_scvi(
    adata: ad.AnnData,
    batch_key: str,
    layer: str = "counts",
    n_latent: int = 25,
    n_hidden: int = 128,
    n_layers: int = 2,
    max_epochs: int | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    labels: pd.Series | None = None,
):
    """A trained scvi-tools SCVI model on the raw counts of `layer` with `batch_key` as covariate.

    `labels` (cells,), if given, ride along unregistered in the model's obs as ``_scinv_label``, so
    that :func:`scanvi_embedding` can fine-tune this very model (scVI never sees them).
    """
    try:
        import scvi
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ScinvInputError("scvi/scanvi baselines need scvi-tools: pip install 'scinv[baselines]' (or drop them from baselines)") from err

    _check_batches(adata, batch_key, "scvi")
    if layer and layer not in adata.layers:
        raise ScinvInputError(f"scvi: layer '{layer}' with raw counts not found; run the NORMALIZE step first")
    scvi.settings.seed = seed
    obs = adata.obs[[batch_key]].astype(str).astype("category")
    if labels is not None:
        obs[SCANVI_LABELS] = np.asarray(labels, dtype=object)
    data = ad.AnnData(X=adata.layers[layer] if layer else adata.X, obs=obs)
    scvi.model.SCVI.setup_anndata(data, batch_key=batch_key)
    model = scvi.model.SCVI(data, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers)
    model.train(max_epochs=max_epochs, accelerator=accelerator, enable_progress_bar=False, early_stopping=True, callbacks=[_epoch_logger()])
    log.info("scvi: trained %d epochs", len(model.history["elbo_train"]))
    return model


def scvi_embedding(adata: ad.AnnData, batch_key: str, **scvi_options) -> np.ndarray:
    """scVI (scvi-tools) trained on raw counts with the batch as covariate -> latent, shape (cells, n_latent).

    `scvi_options` are those of :func:`train_scvi`; its defaults match scinv's default size (20 + 5
    latent dims, 2 x 128 layers) so scores compare like for like. `max_epochs=None` keeps
    scvi-tools' heuristic (min(round(20000 / n_cells * 400), 400)).
    """
    model = train_scvi(adata, batch_key, **scvi_options)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def scanvi_embedding(
    adata: ad.AnnData,
    batch_key: str,
    labels: pd.Series,
    unknown_label: str,
    scanvi_epochs: int | None = None,
    scvi_model=None,
    **scvi_options,
) -> tuple[np.ndarray, np.ndarray]:
    """scANVI: scVI pre-trained as in :func:`scvi_embedding` (`scvi_options`), then fine-tuned with
    the labels (`labels` (cells,), `unknown_label` for cells to predict, e.g. held-out batches), as
    scvi-tools recommends. Returns the latent (cells, n_latent) and scANVI's own classifier's
    predicted labels (cells,). `scanvi_epochs=None` keeps scvi-tools' heuristic (at most 10 epochs
    after pre-training). `scvi_model`: a model from :func:`train_scvi` with these `labels`, to
    fine-tune instead of training a new one.

    It sees the same labels as scinv, so it is the fair comparator for label transfer.
    """
    import scvi

    labels = pd.Series(normalize_labels(labels, unknown_label), index=adata.obs_names).astype(str)
    if (labels != unknown_label).sum() == 0 or labels[labels != unknown_label].nunique() < 2:
        raise ScinvInputError("scanvi: needs at least two known labels; fix label_key")
    model = scvi_model or train_scvi(adata, batch_key, labels=labels, **scvi_options)
    scvi.settings.seed = scvi_options.get("seed", 0)
    scanvi = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category=unknown_label, labels_key=SCANVI_LABELS)
    scanvi.train(max_epochs=scanvi_epochs, accelerator=scvi_options.get("accelerator", "auto"), enable_progress_bar=False)
    log.info("scanvi: fine-tuned %d epochs", len(scanvi.history["elbo_train"]))
    latent = np.asarray(scanvi.get_latent_representation(), dtype=np.float32)
    return latent, np.asarray(scanvi.predict(), dtype=object)
