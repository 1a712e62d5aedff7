"""Resume state round-trips every part exactly and is replaced atomically."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lora_trainer.config.schema import OptimizerConfig, TrainConfig, TrainingConfig
from lora_trainer.errors import TrainingError
from lora_trainer.train.optimizers import build_optimizer
from lora_trainer.train.schedulers import build_scheduler
from lora_trainer.train.state import (
    TrainState, capture_rng, config_hash, load_state, restore_rng, save_state,
)


def _setup(seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = build_optimizer("AdamW", [p], 1e-2, [])
    sched = build_scheduler("cosine", opt, 20, 2)
    return p, opt, sched


def _step(p, opt, sched, g):
    loss = ((p - torch.randn(p.shape, generator=g)) ** 2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_round_trip_continues_identically(tmp_path):
    p, opt, sched = _setup()
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        _step(p, opt, sched, g)
    path = save_state(tmp_path / "run-state", TrainState(3, 0, 3, "abc", [1.0, 2.0, 3.0]),
                      {"w": p.detach()}, opt, sched, capture_rng({"noise": g}))
    expected = [_step(p, opt, sched, g) for _ in range(3)] + [random.random(), float(np.random.rand())]

    random.random(), np.random.rand(), torch.rand(1)  # disturb the global RNGs
    q, opt2, sched2 = _setup(seed=1)
    g2 = torch.Generator().manual_seed(99)
    loaded = load_state(path)
    with torch.no_grad():
        q.copy_(loaded.network["w"])
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    restore_rng(loaded.rng, {"noise": g2})
    got = [_step(q, opt2, sched2, g2) for _ in range(3)] + [random.random(), float(np.random.rand())]
    assert got == expected
    assert loaded.train_state == TrainState(3, 0, 3, "abc", [1.0, 2.0, 3.0])
    assert loaded.scaler is None


def test_rewrite_replaces_and_leaves_no_temp(tmp_path):
    p, opt, sched = _setup()
    for step in (1, 2):
        save_state(tmp_path / "s", TrainState(step, 0, step), {"w": p.detach()}, opt, sched, capture_rng({}))
    assert load_state(tmp_path / "s").train_state.global_step == 2
    assert [x.name for x in tmp_path.iterdir()] == ["s"]


def test_bad_folder_is_named(tmp_path):
    with pytest.raises(TrainingError, match="not a resume state folder"):
        load_state(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_state.json").write_text("{}")
    with pytest.raises(TrainingError, match="missing network.safetensors"):
        load_state(tmp_path / "half")


def test_config_hash_ignores_stop_settings_only():
    base = TrainConfig()
    longer = TrainConfig(training=TrainingConfig(max_train_steps=5))
    other_lr = TrainConfig(optimizer=OptimizerConfig(learning_rate=1.0))
    assert config_hash(base) == config_hash(longer) != config_hash(other_lr)
