"""Training survives SIGKILL: a rerun resumes from the last checkpoint and ends where an uninterrupted run ends."""
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from scinv.io import write_h5ad

from conftest import BIN


def train_cmd(data, out, ckpt=None, epochs=24):
    cmd = [sys.executable, str(BIN / "scinv_train.py"), "--input", str(data), "--model-dir", str(out / "model"),
           "--history", str(out / "history.csv"), "--label-key", "cell_type", "--max-epochs", str(epochs),
           "--n-hidden", "64", "--early-stopping-patience", "0", "--kl-warmup-epochs", "4", "--predictor-epochs", "0",
           "--threads", "1", "--seed", "7"]
    if ckpt:
        cmd += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    return cmd


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, small_adata):
    from scinv.datasets import synthetic_counts

    adata = synthetic_counts(n_cells=3000, n_genes=300, n_batches=3, n_types=4, seed=2)
    data = tmp_path / "data.h5ad"
    write_h5ad(adata, data)
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    ckpt = tmp_path / "ckpt"

    full = subprocess.run(train_cmd(data, tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(train_cmd(data, tmp_path / "killed", ckpt), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        f = ckpt / "last.ckpt"
        if f.exists() and torch.load(f, weights_only=True)["epoch"] >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt / "last.ckpt", weights_only=True)["epoch"]
    assert 6 <= killed_at < 24, "the run must be killed mid-training"
    assert not (tmp_path / "killed" / "model").exists(), "a killed run must not leave a finished-looking model"
    assert not [p for p in ckpt.iterdir() if p.name != "last.ckpt"], "no temporary checkpoint left behind"

    rerun = subprocess.run(train_cmd(data, tmp_path / "killed", ckpt), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {ckpt / 'last.ckpt'} at epoch {killed_at}" in rerun.stderr

    h_full = pd.read_csv(tmp_path / "full" / "history.csv")
    h_resumed = pd.read_csv(tmp_path / "killed" / "history.csv")
    assert list(h_resumed["epoch"]) == list(range(1, 25))
    final_full, final_resumed = h_full["train_loss"].iloc[-1], h_resumed["train_loss"].iloc[-1]
    assert abs(final_full - final_resumed) <= 1e-3 * abs(final_full)
