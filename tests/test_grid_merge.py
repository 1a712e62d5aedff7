"""Grids render by merging: each strength is merged into the weights once for all its seeds (no bypass forwards),
the merged image matches the bypass one, and after a grid (finished, cancelled or failed) every weight is the same
tensor object with the same bits as before."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lora_trainer.config import NetworkConfig
from lora_trainer.grids import (
    FileSnapshot, GridSettings, LiveSnapshot, RenderSettings, adapter_renderer, plan_grid, run_grid, seed_axis,
    snapshot_axis, strength_axis,
)
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import LoRANetwork, MergedWeights
from lora_trainer.train import LiveLoRA

SETTINGS = GridSettings("square, red", RenderSettings(width=32, height=32, steps=3, sampler="Euler a"), "blurry")


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir)


def _live_lora(adapter, seed: int, algo: str = "lora") -> LiveLoRA:
    cfg = NetworkConfig(algo=algo, network_dim=4, network_alpha=4, conv_dim=2, conv_alpha=2)
    network = LoRANetwork.create(adapter.lora_targets(include_conv=True), cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return LiveLoRA(network, lambda a: a.lora_targets(include_conv=True))


def _weights(adapter) -> dict:
    """Every parameter of every target layer: name -> (tensor object, copy of its bits)."""
    found = {}
    for named in adapter.lora_targets(include_conv=True).values():
        for name, module in named.items():
            for key, param in module.named_parameters():
                found[f"{name}.{key}"] = (param, param.detach().clone())
    return found


def _assert_given_back(adapter, before: dict) -> None:
    after = _weights(adapter)
    assert after.keys() == before.keys()
    for key, (param, _) in after.items():
        assert param is before[key][0], key
        assert torch.equal(param, before[key][1]), key


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _plan(snapshots, strengths, seeds):
    return plan_grid(SETTINGS, strength_axis(strengths), snapshot_axis(snapshots), seed_axis(seeds))


def _watching_renderer(adapter, live: LiveLoRA, before: dict, seen: list):
    """The adapter's renderer, noting per render which merged weight objects sit in the model."""
    render = adapter_renderer(adapter)

    def watch(prompt, negative, seed, settings):
        replaced = [(k, p) for k, (p, _) in _weights(adapter).items() if p is not before[k][0]]
        ids = tuple(sorted(id(p) for _, p in replaced))
        total = sum(p.detach().double().sum().item() for _, p in replaced)
        seen.append((settings.lora_state, seed, live.applied, ids, total))
        return render(prompt, negative, seed, settings)

    return watch


def test_each_strength_is_merged_once_for_its_seeds_and_every_weight_comes_back(sd1, single_thread, monkeypatch):
    live = _live_lora(sd1, seed=3)
    before = _weights(sd1)
    seen: list = []
    merges = []
    merge = MergedWeights.merge
    monkeypatch.setattr(MergedWeights, "merge", lambda self: (merges.append(self.network.multiplier), merge(self)))
    plan = _plan([LiveSnapshot(live)], (0.0, 0.5, 1.0), (1, 2))
    result = run_grid(plan, sd1, _watching_renderer(sd1, live, before, seen))
    assert [(state, seed) for state, seed, *_ in seen] == [
        ("base", 1), ("base", 2), ("in memory@0.5", 1), ("in memory@0.5", 2), ("in memory@1", 1), ("in memory@1", 2)]
    assert not any(applied for _, _, applied, *_ in seen)  # no bypass forwards while rendering
    assert seen[0][3] == seen[1][3] == ()  # the base model's own weights
    assert merges == [0.5, 1.0]  # one merge for both seeds of a strength
    assert seen[2][3] and seen[2][3:] == seen[3][3:]
    assert seen[4][3] == seen[2][3] and seen[4][4] != seen[2][4]  # the next strength, written into the same buffers
    assert result.image is not None and not live.applied
    _assert_given_back(sd1, before)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_merged_cell_matches_the_bypass_render_and_strength_zero_the_base(sd1, algo, single_thread):
    live = _live_lora(sd1, seed=4, algo=algo)
    render = adapter_renderer(sd1)
    base = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 5, SETTINGS.render))
    live.multiplier = 0.7
    live.apply(sd1)
    bypass = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 5, SETTINGS.render))
    live.remove()
    result = run_grid(_plan([LiveSnapshot(live)], (0.0, 0.7), (5,)), sd1, render)
    cells = {c.cell.strength: _pixels(c.image) for c in result.cells}
    assert np.array_equal(cells[0.0], base)
    assert not np.array_equal(cells[0.7], base)
    assert np.abs(cells[0.7] - bypass).mean() < 0.05 and np.abs(cells[0.7] - bypass).max() <= 2
    assert live.multiplier == 0.7


def test_cancel_mid_grid_puts_the_original_weights_back(sd1, tmp_path, single_thread):
    live = _live_lora(sd1, seed=5)
    saved = live.save(tmp_path / "mine-000001.safetensors", dtype=torch.float32)
    before = _weights(sd1)
    cancel = threading.Event()
    merged_when_cancelled = []

    def on_cell(cell_result, done, total):
        if not cell_result.cell.is_base:
            merged_when_cancelled.append(any(p is not before[k][0] for k, (p, _) in _weights(sd1).items()))
            cancel.set()

    plan = _plan([FileSnapshot(saved), LiveSnapshot(live)], (0.0, 1.0), (1, 2))
    result = run_grid(plan, sd1, adapter_renderer(sd1), cancel=cancel, on_cell=on_cell)
    assert result.cancelled and merged_when_cancelled == [True]
    _assert_given_back(sd1, before)


def test_render_error_mid_grid_puts_the_original_weights_back(sd1):
    live = _live_lora(sd1, seed=6)
    before = _weights(sd1)
    render = adapter_renderer(sd1)
    calls = []

    def failing(prompt, negative, seed, settings):
        calls.append(settings.lora_state)
        if settings.lora_state != "base":
            raise RuntimeError("out of memory")
        return render(prompt, negative, seed, settings)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_grid(_plan([LiveSnapshot(live)], (0.0, 1.0), (1,)), sd1, failing)
    assert calls == ["base", "in memory@1"]
    _assert_given_back(sd1, before)
