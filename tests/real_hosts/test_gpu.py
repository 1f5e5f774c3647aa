"""Mixed precision on CUDA: fp16 with the grad scaler and bf16 autocast, vectors kept fp32. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from embedding_trainer.config import TrainConfig
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.trainer import Trainer, prepare_run
from tests.helpers import make_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"),
]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_fp32_vectors_on_cuda(tmp_path, tiny_model_dirs, family, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    make_images(tmp_path / "images", count=4)
    config = TrainConfig(
        name="my-cat",
        images=str(tmp_path / "images"),
        resolution=64,
        max_steps=5,
        batch_size=2,
        precision=precision,
        grad_clip="norm",
        output_dir=str(tmp_path / "out"),
        run_dir=str(tmp_path / "run"),
        device="cuda",
    )
    prepared = prepare_run(config, device=config.device)
    where = prepared.placement  # as the command line does: the model is loaded where the run was prepared for
    assert where is not None and (where.device.type, where.precision) == ("cuda", precision)
    host = DiffusersHost.from_pretrained(tiny_model_dirs(family), device=where.device, dtype=where.dtype)
    trainer = Trainer(prepared, host)
    init = {k: v.clone() for k, v in trainer.vectors.items()}
    result = trainer.run()
    assert result.steps == 5 and math.isfinite(result.final_loss)
    data = load_embedding(result.embedding_path, host.encoders)
    for key, vectors in data.vectors.items():
        assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
        assert not torch.equal(vectors, init[key])  # fp16: the scaler may skip early steps, not all five
