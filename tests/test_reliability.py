"""Training survives SIGKILL: a rerun resumes from the last checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import BIN
from scinv.io import write_h5ad


def train_cmd(data, out, ckpt=None, epochs=24):
    cmd = [
        sys.executable,
        str(BIN / "scinv_train.py"),
        "--input",
        str(data),
        "--model-dir",
        str(out / "model"),
        "--history",
        str(out / "history.csv"),
        "--label-key",
        "cell_type",
        "--max-epochs",
        str(epochs),
        "--n-hidden",
        "64",
        "--early-stopping-patience",
        "0",
        "--kl-warmup-epochs",
        "4",
        "--predictor-epochs",
        "0",
        "--threads",
        "1",
        "--seed",
        "7",
    ]
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


@pytest.fixture
def s3_bucket(monkeypatch):
    """A local S3 endpoint (moto server) with one bucket; clients find it through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="scinv-ckpt")
    yield boto3.client("s3")
    server.stop()


def test_checkpoints_on_s3_resume_a_rerun(tmp_path, s3_bucket):
    """--checkpoint-dir s3://...: the checkpoint lands in the bucket and a longer rerun continues from it."""
    from scinv.datasets import synthetic_counts

    data = tmp_path / "data.h5ad"
    write_h5ad(synthetic_counts(n_cells=800, n_genes=100, n_batches=2, n_types=3, seed=3), data)
    for name in ("full", "first", "rerun"):
        (tmp_path / name).mkdir()
    url = "s3://scinv-ckpt/runs/r1"

    full = subprocess.run(train_cmd(data, tmp_path / "full", epochs=8), capture_output=True, text=True)
    first = subprocess.run(train_cmd(data, tmp_path / "first", url, epochs=4), capture_output=True, text=True)
    assert full.returncode == 0 and first.returncode == 0, first.stderr[-2000:]
    keys = [o["Key"] for o in s3_bucket.list_objects_v2(Bucket="scinv-ckpt")["Contents"]]
    assert keys == ["runs/r1/last.ckpt"]

    rerun = subprocess.run(train_cmd(data, tmp_path / "rerun", url, epochs=8), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {url}/last.ckpt at epoch 4" in rerun.stderr
    h_full = pd.read_csv(tmp_path / "full" / "history.csv")
    h_rerun = pd.read_csv(tmp_path / "rerun" / "history.csv")
    assert list(h_rerun["epoch"]) == list(range(1, 9))
    assert abs(h_full["train_loss"].iloc[-1] - h_rerun["train_loss"].iloc[-1]) <= 1e-3 * abs(h_full["train_loss"].iloc[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_TMPFILE and /proc/self/fd are Linux's")
def test_write_bytes_atomically_never_names_a_partial_file(tmp_path, monkeypatch):
    """Checkpoints are written to an unnamed file that is linked in only when complete; a stale temp
    file from an earlier kill is replaced, and the result is readable like any other output."""
    from scinv.io import write_bytes_atomically

    target = tmp_path / "ckpt" / "last.ckpt"
    target.parent.mkdir()
    (target.parent / ".last.ckpt.tmp").write_bytes(b"half-written by a killed run")

    def refuse(self, data):
        raise AssertionError("the named-temp fallback was used")

    monkeypatch.setattr(Path, "write_bytes", refuse)  # on Linux the unnamed-file path must do the write
    write_bytes_atomically(target, b"first")
    write_bytes_atomically(target, memoryview(b"second, longer"))
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
