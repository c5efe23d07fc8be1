#!/usr/bin/env python
"""Derive coarse cell-type labels for the bundled Liao et al. 2020 BALF data from marker genes.

The published files carry no cell-type labels. This script makes *derived* labels, reproducibly:
cells with >= 200 genes and < 20 % mitochondrial counts are normalised (10^4, log1p), 2,000
batch-aware HVGs and 30 PCs are computed, Leiden clustering (resolution 1.0, seed 0) runs on a
15-NN graph, and each cluster gets the coarse type whose canonical markers have the highest mean
scanpy `score_genes` score in it (clusters whose best score is below 0.1 are 'Unknown').
Cells not written out (filtered here) are 'Unknown' in the pipeline.

    .venv/bin/python scripts/derive_liao2020_labels.py   # rewrites assets/liao2020/derived_celltype_labels.csv

The labels are a convenience for demonstrating label-aware integration, not a curated annotation.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc

from scinv.preprocess import load_input, qc_metrics

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {
    "Macrophage": ["CD68", "C1QA", "C1QB", "APOE", "MARCO", "FABP4"],
    "Monocyte": ["CD14", "S100A8", "S100A9", "FCN1", "VCAN"],
    "T/NK cell": ["CD3D", "CD3E", "CD2", "IL7R", "NKG7", "GNLY"],
    "B/Plasma cell": ["MS4A1", "CD79A", "MZB1", "JCHAIN"],
    "Neutrophil": ["FCGR3B", "CXCR2", "CSF3R"],
    "Epithelial": ["KRT18", "KRT8", "EPCAM", "SCGB1A1", "TPPP3", "CAPS"],
    "Dendritic cell": ["CD1C", "FCER1A", "CLEC9A", "LILRA4"],
    "Mast cell": ["TPSAB1", "CPA3"],
}


def main() -> None:
    adata = load_input(str(ROOT / "assets" / "samplesheet_test.csv"))
    qc_metrics(adata)
    adata = adata[(adata.obs["n_genes_by_counts"] >= 200) & (adata.obs["pct_counts_mt"] < 20)].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", layer="counts", batch_key="batch")
    sc.pp.pca(adata, n_comps=30, mask_var="highly_variable", random_state=0)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=0)
    sc.tl.leiden(adata, resolution=1.0, random_state=0, flavor="igraph", n_iterations=2)
    scores = pd.DataFrame(index=adata.obs_names)
    for name, genes in MARKERS.items():
        present = [g for g in genes if g in adata.var_names]
        sc.tl.score_genes(adata, present, score_name="s", random_state=0)
        scores[name] = adata.obs["s"]
    by_cluster = scores.groupby(adata.obs["leiden"], observed=True).mean()
    best = by_cluster.idxmax(axis=1).where(by_cluster.max(axis=1) >= 0.1, "Unknown")
    labels = adata.obs["leiden"].map(best).astype(str)
    out = pd.DataFrame({"cell_id": adata.obs_names, "celltype_derived": labels.to_numpy()})
    path = ROOT / "assets" / "liao2020" / "derived_celltype_labels.csv"
    out.to_csv(path, index=False)
    print(out["celltype_derived"].value_counts().to_string())
    print(pd.crosstab(labels, adata.obs["sample"]).to_string())
    print(f"wrote {path}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
