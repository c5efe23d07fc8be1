"""Property-based tests: the validators never crash obscurely, whatever the input."""

import string

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scinv.errors import ScinvInputError
from scinv.io import check_counts, read_samplesheet

cell = st.text(alphabet=string.ascii_letters + string.digits + " ,;\t\"'._-/", max_size=12)
rows = st.lists(st.lists(cell, min_size=0, max_size=5), min_size=0, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, header=st.sampled_from(["sample,path", "sample,path,batch", "path,sample,condition", "sample;path", "", "sample"]))
def test_samplesheet_validator_only_raises_input_errors(tmp_path, rows, header):
    (tmp_path / "a.h5ad").write_text("x")
    text = header + "\n" + "\n".join(",".join(r) for r in rows)
    f = tmp_path / "s.csv"
    f.write_text(text)
    try:
        df = read_samplesheet(f)
    except ScinvInputError as err:
        assert "\n" not in str(err) and "s.csv" in str(err)
        return
    assert {"sample", "path", "batch"} <= set(df.columns)
    assert df["sample"].is_unique and (df["sample"] != "").all()


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.one_of(st.integers(-3, 50).map(float), st.floats(allow_nan=True, allow_infinity=True, width=32)), min_size=0, max_size=30))
def test_count_validator_accepts_exactly_nonnegative_finite_integers(values):
    n = len(values)
    matrix = sp.csr_matrix(np.asarray(values, dtype=np.float32).reshape(max(n, 1) if n else 0, 1) if n else np.zeros((0, 1), np.float32))
    arr = np.asarray(values, dtype=np.float32)
    nz = arr[arr != 0]
    # integers within 1e-6: float32 storage of counts may carry rounding noise
    valid = n > 0 and nz.size > 0 and np.all(np.isfinite(nz)) and np.all(nz >= 0) and np.all(np.abs(nz - np.round(nz)) <= 1e-6)
    if valid:
        check_counts(matrix, "x.h5ad")
    else:
        with pytest.raises(ScinvInputError):
            check_counts(matrix, "x.h5ad")
