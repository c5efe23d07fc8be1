#!/usr/bin/env python3
"""Write the bundled Liao et al. 2020 data (assets/liao2020) in the input layouts users have.

    .venv/bin/python scripts/convert_example_data.py --outdir converted

writes, under --outdir:
  liao.h5ad                  one .h5ad: Ensembl ids as var_names, symbols in var['feature_name'],
                             counts only in .raw.X (X log-normalised), obs 'batch' and 'cell_type'
                             (NaN where the derived labels have none), as CELLxGENE-style exports;
  cellranger.csv             samplesheet: C144 as a Cell Ranger 3 MTX folder, C146 as a Cell
                             Ranger 2 MTX folder, C149 as a Cell Ranger 2 .h5;
  h5ad_kinds.csv             samplesheet: C144 CSC uint16 counts, C146 int64 counts in
                             layers['counts'], C149 CSR counts in X;
  labels.csv                 the derived labels as a cell_id,cell_type annotation table.

Then, e.g.:  tools/nextflow run main.nf --input converted/liao.h5ad --batch_key batch --label_key cell_type --outdir out
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import click
import numpy as np
import pandas as pd

from scinv.datasets import write_input
from scinv.io import read_counts

ROOT = Path(__file__).resolve().parents[1]
SHEET = ROOT / "assets" / "samplesheet_test.csv"
LABELS = ROOT / "assets" / "liao2020" / "derived_celltype_labels.csv"


def donors() -> dict[str, ad.AnnData]:
    sheet = pd.read_csv(SHEET)
    return {row.sample: read_counts(SHEET.parent / row.path) for row in sheet.itertuples()}


@click.command()
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Folder to write the converted inputs to.")
def main(outdir):
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(LABELS).set_index("cell_id")["celltype_derived"]
    labels.rename("cell_type").reset_index().to_csv(out / "labels.csv", index=False)
    parts = donors()

    for name, kinds in (("cellranger", ("mtx_v3", "mtx_v2", "h5_v2")), ("h5ad_kinds", ("csc_uint16", "int64_in_counts_layer", "plain"))):
        rows = []
        for (sample, adata), kind in zip(parts.items(), kinds):
            rows.append((sample, write_input(adata, out / name / sample, kind)))
        pd.DataFrame(rows, columns=["sample", "path"]).to_csv(out / f"{name}.csv", index=False)

    merged = ad.concat(parts, label="batch", index_unique="_", merge="same")  # cell ids <donor>_<barcode>
    merged.obs_names = [f"{b}_{n.rsplit('_', 1)[0]}" for n, b in zip(merged.obs_names, merged.obs["batch"])]
    merged.obs["cell_type"] = labels.reindex(merged.obs_names).to_numpy()  # NaN: no derived label
    merged.var = pd.DataFrame({"feature_name": merged.var_names.to_numpy()}, index=pd.Index(merged.var["gene_ids"].to_numpy()))
    merged.var_names_make_unique()
    merged.raw = merged.copy()
    import scanpy as sc

    sc.pp.normalize_total(merged, target_sum=1e4)
    sc.pp.log1p(merged)
    merged.X = merged.X.astype(np.float32)
    merged.write_h5ad(out / "liao.h5ad", compression="gzip")
    click.echo(f"wrote {out}/liao.h5ad ({merged.n_obs} cells), {out}/cellranger.csv, {out}/h5ad_kinds.csv, {out}/labels.csv")


if __name__ == "__main__":
    main()
