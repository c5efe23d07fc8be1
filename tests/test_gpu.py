"""The model on a CUDA device: the same losses as on the CPU, and every user step (skipped without a GPU).

CI has no GPU; run these on a GPU machine with `pytest tests/test_gpu.py` (session 12 ran them on an H200).
"""

import numpy as np
import pytest
import torch

from scinv.datasets import synthetic_counts
from scinv.model import InVAE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAST = dict(max_epochs=6, batch_size=256, seed=0, log_every=6)


@pytest.fixture(scope="module")
def split():
    adata = synthetic_counts(n_cells=4000, n_genes=800, n_batches=4, n_types=5, seed=0)
    return adata[adata.obs["batch"] != "b3"].copy(), adata[adata.obs["batch"] == "b3"].copy()


def make_model(adata):
    return InVAE(adata, layer="counts", batch_key="batch", label_key="cell_type")


def test_cuda_training_matches_cpu(split):
    ref, _ = split
    losses = {device: make_model(ref).train(device=device, **FAST)[-1]["train_loss"] for device in ("cpu", "cuda")}
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.01)


def test_every_user_step_on_cuda(split, tmp_path):
    ref, query = split
    model = make_model(ref)
    model.train(device="cuda", **FAST)
    assert model.device.type == "cuda"
    model.train_predictor(max_epochs=5)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    assert (model.predict(query)[0] == truth).mean() > 0.9
    model.store_reference(max_cells=1000, umap=False)
    assert np.isfinite(model.novelty(query)).all()
    # the masks on the new batch columns must live on the training device (they were made on the CPU)
    mapped = model.map_query(query, max_epochs=3, device="cuda")
    assert (mapped.predict(query)[0] == truth).mean() > 0.9
    z = model.get_latent_representation(ref, "inv")
    model.save(tmp_path / "model")
    on_cpu = InVAE.load(tmp_path / "model", device="cpu")
    np.testing.assert_allclose(on_cpu.get_latent_representation(ref, "inv"), z, atol=1e-4)


def test_checkpoint_resume_on_cuda(split, tmp_path):
    ref, _ = split
    straight = make_model(ref).train(device="cuda", max_epochs=4, seed=0, log_every=4)
    first = make_model(ref)
    first.train(device="cuda", max_epochs=2, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=1, log_every=4)
    resumed = make_model(ref).train(device="cuda", max_epochs=4, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=1, log_every=4)
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-3)
