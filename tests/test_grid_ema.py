"""Raw vs EMA side by side in a grid: a real JobManager on the standalone host trains a tiny SD1 LoRA with an EMA; the
grid offers the EMA in memory and the saved `-ema` files as snapshots and renders them differently from the raw LoRA."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.host import StandaloneHost
from lora_trainer.host.grid_service import IN_MEMORY, IN_MEMORY_EMA, GridRequest, GridService
from lora_trainer.train.job import JobManager

SMALL = {"width": 32, "height": 32, "steps": 2, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """The last run trained UNet and text encoder for 2 steps with an EMA of decay 0.9, saving step 1 and the end."""
    root = tmp_path_factory.mktemp("grid_ema")
    data = root / "data" / "1_dot"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (120 * i, 90, 180)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"dot, blue, item{i}", encoding="utf-8")
    config = config_from_dict({
        "pretrained_model_name_or_path": str(tiny_sd1.checkpoint), "diffusers_config_dir": str(tiny_sd1.config_dir),
        "tokenizer_dir": str(tiny_sd1.tokenizer_dir), "train_data_dir": str(data.parent),
        "output_dir": str(root / "out"), "resolution": "64,64", "output_name": "last", "max_train_steps": 2,
        "network_dim": 2, "network_alpha": 2, "learning_rate": 0.05, "seed": 1, "save_every_n_steps": 1,
        "save_precision": "float", "ema": True, "ema_decay": 0.9, "ema_warmup": False}).config
    manager = JobManager(StandaloneHost(root / "loras", device="cpu"))
    status = manager.start(config).wait(300)
    assert status.state.value == "finished", status.message
    return manager


def test_the_ema_snapshots_are_listed(trained):
    service = GridService(trained)
    assert service.snapshot_labels() == ["step 1", "step 1 (EMA)", "last", "last (EMA)", IN_MEMORY, IN_MEMORY_EMA]
    live = trained.last.live_lora
    assert live.ema is not None and live.ema.network is not live.network


def test_raw_and_ema_render_differently_side_by_side(trained, single_thread):
    service = GridService(trained, cell_limit=16)
    labels = ("last", "last (EMA)", IN_MEMORY, IN_MEMORY_EMA)
    outcome = service.run(GridRequest("dot, blue", strengths=(0.0, 1.0), seeds=(3,), snapshots=labels, **SMALL),
                          save=False)
    images = {(c.cell.snapshot.label, c.cell.strength): np.asarray(c.image) for c in outcome.result.cells}
    assert len(images) == 8
    base = images[("last", 0.0)]
    assert all(np.array_equal(images[(label, 0.0)], base) for label in labels), "strength 0 is the base model"
    assert not np.array_equal(images[("last", 1.0)], images[("last (EMA)", 1.0)])
    assert not np.array_equal(images[(IN_MEMORY, 1.0)], images[(IN_MEMORY_EMA, 1.0)])
    assert not np.array_equal(images[(IN_MEMORY_EMA, 1.0)], base)
    # the EMA in memory is the EMA that was saved (float precision): the same image to rounding
    diff = np.abs(images[(IN_MEMORY_EMA, 1.0)].astype(int) - images[("last (EMA)", 1.0)].astype(int))
    assert diff.max() <= 1
    live = trained.last.live_lora
    assert not live.applied and not live.ema.applied and live.ema.multiplier == 1.0
