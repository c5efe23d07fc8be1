"""The METRICS step's scores: k-means NMI/ARI in both profiles, and bio conservation as their mean with the other bio metrics."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scinv.metrics import BIO_COLUMNS, kmeans_nmi_ari, run_scib


def clustered(n_cells=900, n_labels=3, n_batches=3, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_labels, size=n_cells)
    batches = rng.integers(n_batches, size=n_cells)
    centres = rng.normal(0, 10, (n_labels, 8))
    obs = pd.DataFrame({"batch": [f"b{b}" for b in batches], "cell_type": [f"t{t}" for t in labels]}, index=[f"c{i}" for i in range(n_cells)])
    separated = (centres[labels] + rng.normal(0, spread, (n_cells, 8))).astype(np.float32)
    noise = rng.normal(0, 1, (n_cells, 8)).astype(np.float32)
    return ad.AnnData(np.zeros((n_cells, 1), np.float32), obs=obs, obsm={"X_good": separated, "X_noise": noise, "X_pca": separated})


def test_kmeans_nmi_ari_is_one_on_separated_labels_and_near_zero_on_noise():
    adata = clustered()
    labels = adata.obs["cell_type"].to_numpy()
    assert kmeans_nmi_ari(adata.obsm["X_good"], labels) == pytest.approx((1.0, 1.0))
    nmi, ari = kmeans_nmi_ari(adata.obsm["X_noise"], labels)
    assert nmi < 0.05 and abs(ari) < 0.05


@pytest.mark.parametrize("profile", ["fast", "full"])
def test_scib_profiles_score_nmi_ari_and_average_them_into_bio(profile):
    df = run_scib(clustered(), ["X_good", "X_noise"], "batch", "cell_type", profile=profile, n_jobs=1)
    assert {"KMeans NMI", "KMeans ARI"} <= set(df.columns)
    assert df.loc["X_good", "KMeans NMI"] > 0.99 and df.loc["X_noise", "KMeans NMI"] < 0.05
    bio = [c for c in BIO_COLUMNS if c in df.columns]
    assert np.allclose(df["Bio conservation"], df[bio].mean(axis=1))
    assert np.allclose(df["Total"], 0.4 * df["Batch correction"] + 0.6 * df["Bio conservation"])
    assert df.loc["X_good", "Bio conservation"] > df.loc["X_noise", "Bio conservation"] + 0.3
