"""A single self-contained HTML report: every figure is an embedded PNG, no external assets."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .labels import unlabelled  # noqa: E402

log = logging.getLogger("scinv")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;color:#222;padding:0 1em}
h1{border-bottom:3px solid #3b6ea5;padding-bottom:.3em} h2{color:#3b6ea5;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:13px} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#eef3f9} td:first-child,th:first-child{text-align:left} figure{margin:1em 0} img{max-width:100%}
figcaption{color:#555;font-size:13px} .note{color:#555;font-size:13px} .kv td{text-align:left} nav a{margin-right:1em}
.warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:6px 10px}
"""
PALETTE = plt.get_cmap("tab20").colors


def fig_to_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def table_html(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    return df.to_html(float_format=lambda v: floatfmt.format(v), border=0, na_rep="–")


def _scatter_by(ax, xy: np.ndarray, values: pd.Series, title: str) -> None:
    values = values.astype(str)
    cats = sorted(values.unique())
    for i, c in enumerate(cats):
        m = (values == c).to_numpy()
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=PALETTE[i % len(PALETTE)], label=c, rasterized=True, linewidths=0)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(cats) <= 20:
        ax.legend(markerscale=4, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))


def umap_grid(adata, basis: str, keys: list[str], title: str) -> str:
    keys = [k for k in keys if k in adata.obs.columns]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _scatter_by(ax, np.asarray(adata.obsm[basis]), adata.obs[key], f"{title}: {key}")
    fig.tight_layout()
    return fig_to_img(fig, f"UMAP {title}")


def qc_violins(qc_obs: pd.DataFrame) -> str:
    metrics = [
        ("n_genes_by_counts", "genes per cell"),
        ("total_counts", "counts per cell"),
        ("pct_counts_mt", "% mitochondrial"),
        ("pct_counts_ribo", "% ribosomal"),
    ]
    metrics = [m for m in metrics if m[0] in qc_obs.columns]
    samples = sorted(qc_obs["sample"].astype(str).unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (col, label) in zip(axes[0], metrics):
        data = [qc_obs.loc[qc_obs["sample"].astype(str) == s, col].to_numpy(float) for s in samples]
        parts = ax.violinplot([d if len(d) else [np.nan] for d in data], showmedians=True)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
        ax.set_xticks(range(1, len(samples) + 1), samples, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=11)
        if col in ("n_genes_by_counts", "total_counts"):
            ax.set_yscale("log")
    fig.tight_layout()
    return fig_to_img(fig, "QC violins")


def qc_scatter(qc_obs: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    kept = qc_obs["qc_reason"].astype(str) == "kept"
    ax.scatter(qc_obs.loc[~kept, "total_counts"], qc_obs.loc[~kept, "n_genes_by_counts"], s=2, c="#d62728", label="removed", rasterized=True)
    sc = ax.scatter(
        qc_obs.loc[kept, "total_counts"],
        qc_obs.loc[kept, "n_genes_by_counts"],
        s=2,
        c=qc_obs.loc[kept, "pct_counts_mt"],
        cmap="viridis",
        label="kept",
        rasterized=True,
    )
    fig.colorbar(sc, ax=ax, label="% mitochondrial (kept cells)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("counts per cell")
    ax.set_ylabel("genes per cell")
    ax.legend(markerscale=5, frameon=False)
    return fig_to_img(fig, "QC scatter")


def training_curves(history: list[dict]) -> str:
    h = pd.DataFrame(history)
    terms = [t for t in ("loss", "reconstruction", "kl_inv", "kl_spur") if f"train_{t}" in h.columns]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.4), squeeze=False)
    for ax, t in zip(axes[0], terms):
        ax.plot(h["epoch"], h[f"train_{t}"], label="train")
        if f"validation_{t}" in h.columns:
            ax.plot(h["epoch"], h[f"validation_{t}"], label="validation")
        ax.set_title(t, fontsize=11)
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig_to_img(fig, "training curves")


def scib_figure(metrics: pd.DataFrame) -> str:
    cols = [c for c in metrics.columns if metrics[c].notna().any()]
    data = metrics[cols].to_numpy(float)
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.55 * len(metrics) + 1.6))
    im = ax.imshow(data, cmap="YlGnBu", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(len(metrics)), metrics.index, fontsize=9)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white" if data[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig_to_img(fig, "scIB metrics")


def confusion_figure(true: pd.Series, pred: pd.Series) -> str:
    tab = pd.crosstab(true.astype(str), pred.astype(str), normalize="index")
    fig, ax = plt.subplots(figsize=(0.6 * tab.shape[1] + 3, 0.5 * tab.shape[0] + 2))
    im = ax.imshow(tab.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(tab.shape[1]), tab.columns, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(tab.shape[0]), tab.index, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("given label")
    for i in range(tab.shape[0]):
        for j in range(tab.shape[1]):
            ax.text(j, i, f"{tab.iat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if tab.iat[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig_to_img(fig, "confusion matrix")


def _prediction_section(adata, label_key: str, batch_key: str, transfer: pd.DataFrame | None, heldout: list[str], unknown_label: str) -> str:
    """Confusion matrix of the invariant predictor: on the held-out batches when there are any."""
    obs = adata.obs
    cells = ~unlabelled(obs[label_key], unknown_label)
    if heldout and batch_key in obs:
        cells &= obs[batch_key].astype(str).isin(heldout)
        scope = f"the held-out batches ({html.escape(', '.join(heldout))}), whose labels training never saw"
    else:
        scope = "all labelled cells (training cells included, so this is not a transfer score)"
    truth, pred = obs.loc[cells, label_key].astype(str), obs.loc[cells, "scinv_prediction"].astype(str)
    if not len(truth):
        return "<p>No labelled cells to compare predictions with.</p>"
    body = confusion_figure(truth, pred)
    body += f"<p>Invariant predictor vs given labels on {scope}: accuracy {float((truth == pred).mean()):.3f} on {len(truth)} cells.</p>"
    if transfer is not None and len(transfer):
        body += "<h3>Label transfer to held-out batches</h3>" + table_html(transfer)
        body += "<p class='note'>kNN rows: a 15-neighbour distance-weighted classifier fitted on the labelled batches of that embedding.</p>"
    return body


def _mapping_section(adata, reference: pd.DataFrame | None, label_key: str | None, unknown_label: str) -> str:
    """Query mapped onto a trained model: the query on the reference UMAP, labels and novelty per sample."""
    obs = adata.obs
    by = "sample" if "sample" in obs else None
    info = adata.uns.get("scinv_novelty", {})
    threshold = float(info.get("threshold", np.nan))
    body = (
        f"<p>{adata.n_obs} query cells mapped onto a trained model (its weights frozen; only the new batches' "
        f"prior weights trained). Novelty score: mean invariant-latent distance to the 15 nearest reference cells; "
        f"cells above {threshold:.3f} (learned on the reference: the {float(info.get('quantile', np.nan)):.0%} quantile of held-out "
        f"reference cells scored against the other batches, at least {float(info.get('type_gap_fraction', np.nan)):.2f} of the "
        f"gap between the two closest reference types) are predicted 'unknown': {int(obs['scinv_novel'].sum())} cells "
        f"({float(obs['scinv_novel'].mean()):.1%}).</p>"
    )
    if reference is not None and "X_umap_reference" in adata.obsm and "umap_1" in reference:
        panels = [("scinv_prediction", "predicted label")] if "scinv_prediction" in obs else []
        panels.append(("scinv_novel", "called novel"))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
        ref_xy = reference[["umap_1", "umap_2"]].to_numpy()
        xy = adata.obsm["X_umap_reference"]
        for ax, (column, title) in zip(axes[0], panels):
            ax.scatter(ref_xy[:, 0], ref_xy[:, 1], s=2, c="#dddddd", rasterized=True, label="reference")
            _scatter_by(ax, xy, obs[column].astype(str), f"query on the reference UMAP: {title}")
        fig.tight_layout()
        body += fig_to_img(fig, "query cells on the reference UMAP")
    groups = obs[by].astype(str) if by else pd.Series("query", index=obs.index)
    if "scinv_prediction" in obs:
        body += "<h3>Predicted labels per sample</h3>" + table_html(pd.crosstab(groups, obs["scinv_prediction"].astype(str)), "{:.0f}")
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * groups.nunique() + 2), 3.5))
    names = sorted(groups.unique())
    ax.boxplot([obs.loc[groups == g, "scinv_novelty"].to_numpy() for g in names], showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
    ax.axhline(threshold, color="tab:red", linestyle="--", label="threshold")
    ax.set_ylabel("novelty score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    body += "<h3>Novelty per sample</h3>" + fig_to_img(fig, "novelty score per sample")
    if label_key and label_key in obs and "scinv_prediction" in obs:
        cells = ~unlabelled(obs[label_key], unknown_label)
        if cells.any():
            truth, pred = obs.loc[cells, label_key].astype(str), obs.loc[cells, "scinv_prediction"].astype(str)
            known = obs.loc[cells, "scinv_prediction_known_types"].astype(str)
            body += "<h3>Transfer to the query (its labels were never read by the mapping)</h3>" + confusion_figure(truth, pred)
            body += (
                f"<p>Accuracy on {len(truth)} labelled query cells: {float((truth == pred).mean()):.3f} with novel calls "
                f"('unknown' counts as wrong), {float((truth == known).mean()):.3f} for the predictor alone (every cell a known type).</p>"
            )
    return body


def build_report(
    adata,
    qc_obs: pd.DataFrame | None,
    qc_summary: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    history: list[dict],
    batch_key: str,
    label_key: str | None,
    extra_keys: list[str],
    versions: str = "",
    params: dict | None = None,
    title: str = "scinv integration report",
    label_transfer: pd.DataFrame | None = None,
    heldout_batches: list[str] | None = None,
    unknown_label: str = "Unknown",
    reference: pd.DataFrame | None = None,
) -> str:
    """Return the full HTML text. Cells labelled `unknown_label` count as unlabelled.

    `reference`: the model's reference sample (scinv.mapping.REFERENCE_FILE), for a mapped query.
    """
    sections: list[tuple[str, str]] = []
    colour_keys = list(dict.fromkeys(k for k in [batch_key, label_key, *extra_keys] if k))
    overview = pd.DataFrame(
        {
            "value": [
                adata.n_obs,
                adata.n_vars,
                adata.obs[batch_key].nunique() if batch_key in adata.obs else "–",
                adata.obs[label_key].nunique() if label_key and label_key in adata.obs else "–",
            ]
        },
        index=["cells after QC", "genes modelled (HVGs)", "batches", "labels"],
    )
    sections.append(("Overview", table_html(overview)))
    if qc_obs is not None:
        body = qc_violins(qc_obs) + qc_scatter(qc_obs)
        if qc_summary is not None:
            body += "<h3>Cells kept and removed per sample and reason</h3>" + table_html(qc_summary, "{:.0f}")
            dropped = [str(s) for s, n in qc_summary["kept"].items() if n == 0 and s != "total"]
            if dropped:
                body += f"<p class='warn'>Warning: QC kept no cell of sample(s) {html.escape(', '.join(dropped))}; they are left out of everything below.</p>"
        sections.append(("Quality control", body))
    hv = adata.uns.get("scinv_normalize", {})
    used = hv.get("hvg", {}).get("flavor") or hv.get("flavor", "?")
    batch_key_used = html.escape(str(hv.get("batch_key", "?")))
    hv_text = f"{adata.n_vars} highly variable genes ({html.escape(str(used))}, batch key {batch_key_used}); the model is trained on their raw counts."
    if used == "reference":
        missing = hv.get("hvg", {}).get("missing_genes_per_sample", {})
        hv_text = f"The reference model's {adata.n_vars} genes; genes a sample lacked were zero-filled: " + (
            ", ".join(f"{html.escape(str(k))}: {int(v)}" for k, v in missing.items()) or "none"
        )
    if hv.get("hvg", {}).get("fallback"):
        hv_text += f"</p><p class='warn'>Warning: {html.escape(str(hv['hvg']['fallback']))}."
    if "highly_variable_nbatches" in adata.var:
        nb = adata.var["highly_variable_nbatches"].value_counts().sort_index()
        hv_text += " Genes selected in n batches: " + ", ".join(f"{int(k)}: {int(v)}" for k, v in nb.items()) + "."
    sections.append(("Highly variable genes", f"<p>{hv_text}</p>"))
    if history:
        sections.append(
            (
                "Training",
                training_curves(history)
                + f"<p class='note'>{len(history)} epochs; best validation loss {min(h.get('validation_loss', np.inf) for h in history):.2f}.</p>",
            )
        )
    umaps = ""
    for basis, name in (("X_umap_scinv_inv", "invariant latent"), ("X_umap_scinv_spur", "spurious latent"), ("X_umap_pca", "unintegrated PCA")):
        if basis in adata.obsm:
            umaps += f"<h3>{name}</h3>" + umap_grid(adata, basis, colour_keys, name)
    missing = [k for k in extra_keys if k and k not in adata.obs.columns]
    if umaps and missing:
        # a typo in --report_color_keys would otherwise only show as a missing panel
        log.warning("report: obs has no column %s (--report_color_keys); those UMAP panels are left out", missing)
        umaps += f"<p class='note'>Not in obs, so not plotted: {html.escape(', '.join(missing))} (<code>--report_color_keys</code>).</p>"
    if umaps:
        sections.append(("Embeddings", umaps))
    if metrics is not None:
        note = (
            f"<p class='note'>scib-metrics on {metrics.attrs.get('n_cells', 'all')} cells with known labels; raw scores. "
            "'Total' = 0.4 batch + 0.6 bio over all metrics run; 'Total (published)' uses the inVAE paper's aggregation "
            "(batch = mean of BRAS and graph connectivity).</p>"
        )
        sections.append(("Integration metrics (scIB)", scib_figure(metrics) + table_html(metrics) + note))
    if "scinv_novelty" in adata.obs:
        sections.append(("Query mapping", _mapping_section(adata, reference, label_key, unknown_label)))
    elif label_key and "scinv_prediction" in adata.obs and label_key in adata.obs:
        sections.append(("Label prediction", _prediction_section(adata, label_key, batch_key, label_transfer, heldout_batches or [], unknown_label)))
    if versions:
        sections.append(("Software versions", f"<pre>{html.escape(versions)}</pre>"))
    if params:
        kv = pd.DataFrame({"value": [json.dumps(v) if not isinstance(v, str) else v for v in params.values()]}, index=list(params.keys()))
        sections.append(("Parameters", table_html(kv)))
    nav = "".join(f'<a href="#s{i}">{html.escape(name)}</a>' for i, (name, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{html.escape(name)}</h2>{content}' for i, (name, content) in enumerate(sections))
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
    return f"<!DOCTYPE html><html>{head}<body><h1>{html.escape(title)}</h1><p class='note'>Generated {stamp}</p><nav>{nav}</nav>{body}</body></html>"
