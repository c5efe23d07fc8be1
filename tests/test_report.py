import anndata as ad
import numpy as np
import pandas as pd

from scinv.report import build_report


def test_report_scores_predictions_on_labelled_cells_only():
    """Cells carrying the pipeline's --unknown_label (any value, not just 'Unknown') are unlabelled."""
    obs = pd.DataFrame(
        {
            "batch": ["a", "a", "b", "b", "b"],
            "cell_type": ["T", "B", "n/a", "n/a", "T"],
            "scinv_prediction": ["T", "T", "B", "T", "T"],
        },
        index=[f"c{i}" for i in range(5)],
    )
    adata = ad.AnnData(np.zeros((5, 2), np.float32), obs=obs)
    html = build_report(adata, None, None, None, [], "batch", "cell_type", [], unknown_label="n/a")
    assert "accuracy 0.667 on 3 cells" in html
    held = build_report(adata, None, None, None, [], "batch", "cell_type", [], heldout_batches=["b"], unknown_label="n/a")
    assert "accuracy 1.000 on 1 cells" in held


def test_report_names_colour_keys_missing_from_obs(caplog):
    """A --report_color_keys column the data lacks (a typo) is named in the report, not silently dropped."""
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"batch": ["a", "b"] * 5, "cell_type": ["T"] * 10, "donor": ["d1"] * 10}, index=[f"c{i}" for i in range(10)])
    adata = ad.AnnData(np.zeros((10, 2), np.float32), obs=obs)
    adata.obsm["X_umap_scinv_inv"] = rng.normal(size=(10, 2))
    with caplog.at_level("WARNING", logger="scinv"):
        html = build_report(adata, None, None, None, [], "batch", "cell_type", ["donor", "condtion"])
    assert "Not in obs, so not plotted: condtion" in html
    assert "condtion" in caplog.text and "donor" not in caplog.text
    assert "Not in obs" not in build_report(adata, None, None, None, [], "batch", "cell_type", ["donor"])
