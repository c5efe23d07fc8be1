"""What "unlabelled" means, in one place: training, metrics and the report all ask this module.

A cell is unlabelled when its label is missing (NaN/None), empty, a spelling of "missing" that
CSV readers and R leave behind ('nan', 'NA', 'N/A', 'null', 'None', '<NA>'), or `unknown_label`
(``--unknown_label``, default 'Unknown'). Such cells train with the label-marginal prior, get
predictions, and are left out of label metrics.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

UNKNOWN_LABEL = "Unknown"
MISSING_SPELLINGS = frozenset({"", "nan", "na", "n/a", "null", "none", "<na>"})


def as_strings(values) -> pd.Series:
    """Category values as strings; whole-number floats lose their '.0' (1.0 -> '1'); missing stays NaN.

    Numeric batch or label columns (donor 1, 2, ...) and float columns holding NaN (pandas turns
    integer columns with missing values into floats) get the names a user typed.
    """
    s = pd.Series(values, copy=False)
    if pd.api.types.is_float_dtype(s) and np.all(np.isnan(s) | (s == np.round(s))):
        return s.map(lambda v: v if pd.isna(v) else str(int(v)))
    return s.astype(object).where(s.notna(), np.nan).map(lambda v: v if pd.isna(v) else str(v))


def unlabelled(values, unknown_label: str = UNKNOWN_LABEL) -> np.ndarray:
    """(n_cells,) bool: which labels mean "no label" (see the module docstring)."""
    s = as_strings(values)
    text = s.fillna("").str.strip()
    return (s.isna() | text.str.lower().isin(MISSING_SPELLINGS) | (text == unknown_label)).to_numpy()


def normalize_labels(values, unknown_label: str = UNKNOWN_LABEL) -> pd.Categorical:
    """Labels as string categories, every unlabelled spelling replaced by `unknown_label`."""
    s = as_strings(values).fillna("").str.strip()
    return pd.Categorical(s.where(~unlabelled(values, unknown_label), unknown_label).to_numpy())
