"""Strength grids on the in-memory LoRA: base model bit for bit at strength 0, in-memory equals the saved file,
text-encoder LoRAs act, layout and labels, estimate, cell limit, cancel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lora_trainer.config import NetworkConfig
from lora_trainer.errors import NetworkError
from lora_trainer.grids import (
    CellLimitExceeded, FileSnapshot, GridSettings, LiveSnapshot, RenderSettings, adapter_renderer, check_cell_limit,
    estimate_grid, measure_speed, plan_grid, run_grid, seed_axis, snapshot_axis, strength_axis,
)
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import LoRANetwork
from lora_trainer.train import LiveLoRA

SETTINGS = GridSettings("square, red", RenderSettings(width=32, height=32, steps=3, sampler="Euler a"), "blurry")


def _load(tiny):
    return load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return _load(tiny_sd1)


def random_live_lora(adapter, unet: bool = True, te: bool = True, seed: int = 0) -> LiveLoRA:
    """A LoRA with random weights on both sides (a fresh one has lora_up = 0 and changes nothing)."""
    cfg = NetworkConfig(network_dim=4, network_alpha=4, network_train_unet_only=not te,
                        network_train_text_encoder_only=not unet)
    network = LoRANetwork.create(adapter.lora_targets(), cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return LiveLoRA(network, lambda a: a.lora_targets())


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _grid(adapter, snapshots, strengths=(0.0, 1.0), seeds=(7,), **kwargs):
    plan = plan_grid(SETTINGS, strength_axis(strengths), snapshot_axis(snapshots), seed_axis(seeds))
    return run_grid(plan, adapter, adapter_renderer(adapter), **kwargs)


def _cell(result, strength, seed=7, label=None):
    return next(c.image for c in result.cells if c.cell.strength == strength and c.cell.seed == seed
                and (label is None or c.cell.snapshot.label == label))


def test_strength_zero_is_the_base_model_bit_for_bit(sd1, single_thread):
    render = adapter_renderer(sd1)
    base = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 7, SETTINGS.render))
    live = random_live_lora(sd1)
    result = _grid(sd1, [LiveSnapshot(live)], strengths=(0.0, 0.5))
    assert np.array_equal(_pixels(_cell(result, 0.0)), base)
    assert not np.array_equal(_pixels(_cell(result, 0.5)), base)
    live.multiplier = 0.0  # multiplier 0 with the LoRA applied is the base model too
    live.apply(sd1)
    zero = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 7, SETTINGS.render))
    live.remove()
    assert np.array_equal(zero, base)
    assert not live.applied and live.multiplier == 0.0
    after = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 7, SETTINGS.render))
    assert np.array_equal(after, base)  # the grid left the model as it was


def test_in_memory_strength_equals_the_saved_file(sd1, tmp_path, single_thread):
    live = random_live_lora(sd1, seed=1)
    live.multiplier = 0.8
    saved = live.save(tmp_path / "mine-000002.safetensors", dtype=torch.float32)
    result = _grid(sd1, [LiveSnapshot(live), FileSnapshot(saved)], strengths=(0.4, 1.0))
    assert [a.labels for a in result.plan.axes][1] == ("in memory", "epoch 2")
    for strength in (0.4, 1.0):
        memory, file = _pixels(_cell(result, strength, label="in memory")), _pixels(_cell(result, strength,
                                                                                      label="epoch 2"))
        assert np.abs(memory - file).max() <= 1, strength
    assert not np.array_equal(_pixels(_cell(result, 0.4, label="in memory")),
                              _pixels(_cell(result, 1.0, label="in memory")))
    assert live.multiplier == 0.8 and not live.applied  # given back as found


def test_text_encoder_lora_changes_the_image(sd1, single_thread):
    live = random_live_lora(sd1, unet=False, te=True, seed=2)
    assert live.network.te_names() and not live.network.unet_names()
    result = _grid(sd1, [LiveSnapshot(live)], strengths=(0.0, 1.0))
    assert not np.array_equal(_pixels(_cell(result, 0.0)), _pixels(_cell(result, 1.0)))


def test_sdxl_strength_zero_and_in_memory_vs_file(tiny_sdxl, sd1, tmp_path, single_thread):
    adapter = _load(tiny_sdxl)
    sd1_file = random_live_lora(sd1).save(tmp_path / "made_for_sd1.safetensors")
    with pytest.raises(NetworkError, match="made_for_sd1.safetensors: does not fit the loaded sdxl model"):
        FileSnapshot(sd1_file).apply(adapter, 1.0)
    live = random_live_lora(adapter, seed=3)
    saved = live.save(tmp_path / "xl.safetensors", dtype=torch.float32)
    settings = GridSettings(SETTINGS.prompt, RenderSettings(width=32, height=32, steps=1))
    base = _pixels(adapter_renderer(adapter)(settings.prompt, "", 5, settings.render))
    plan = plan_grid(settings, strength_axis((0.0, 0.7)),
                     snapshot_axis([LiveSnapshot(live), FileSnapshot(saved)]), seed_axis((5,)))
    result = run_grid(plan, adapter, adapter_renderer(adapter))
    assert np.array_equal(_pixels(_cell(result, 0.0, seed=5)), base)
    memory, file = (_pixels(_cell(result, 0.7, seed=5, label=label)) for label in ("in memory", "xl"))
    assert np.abs(memory - file).max() <= 1 and not np.array_equal(memory, base)


def test_layout_order_and_shared_base_cells(sd1):
    live_a, live_b = random_live_lora(sd1, seed=4), random_live_lora(sd1, seed=5)
    snapshots = [LiveSnapshot(live_a, "a"), LiveSnapshot(live_b, "b")]
    plan = plan_grid(SETTINGS, strength_axis((0.0, 0.5, 1.0)), snapshot_axis(snapshots), seed_axis((1, 2)))
    assert (plan.x.kind, plan.y.kind, plan.z.kind) == ("strength", "snapshot", "seed")
    assert len(plan.cells) == 12 and plan.renders() == 10  # strength 0 is one base image per seed
    assert {(c.x, c.y, c.z) for c in plan.cells} == {(x, y, z) for x in range(3) for y in range(2) for z in range(2)}
    non_base = [c.snapshot.label for c in plan.cells if not c.is_base]
    assert non_base == sorted(non_base)  # one snapshot after the other: each is put on the model once
    one = plan_grid(SETTINGS, strength_axis((0.0, 1.0)), snapshot_axis(snapshots[:1]), seed_axis((1, 2)))
    assert (one.x.kind, one.y.kind, one.z.kind) == ("strength", "seed", "snapshot")
    with pytest.raises(ValueError, match="layout"):
        plan_grid(SETTINGS, strength_axis((1.0,)), snapshot_axis(snapshots), seed_axis((1,)),
                  layout=("strength", "strength", "seed"))


def test_bad_settings_are_named(sd1):
    axes = (strength_axis((1.0,)), snapshot_axis([LiveSnapshot(random_live_lora(sd1))]), seed_axis((1,)))
    with pytest.raises(ValueError, match="prompt: empty"):
        plan_grid(GridSettings("  ", SETTINGS.render), *axes)
    with pytest.raises(ValueError, match="width: 30 is not a positive multiple of 8"):
        plan_grid(GridSettings("p", RenderSettings(width=30, height=32)), *axes)
    with pytest.raises(ValueError, match="repeats"):
        strength_axis((0.5, 0.5))


def test_estimate_from_measured_speed_and_cell_limit(sd1):
    render = adapter_renderer(sd1)
    speed = measure_speed(render, SETTINGS, probe_steps=2)
    assert speed.it_per_s > 0 and speed.overhead_s >= 0
    snapshots = [LiveSnapshot(random_live_lora(sd1), "a")]
    plan = plan_grid(SETTINGS, strength_axis((0, 0.2, 0.4, 0.6, 0.8, 1)), snapshot_axis(snapshots),
                     seed_axis((1, 2)))
    estimate = estimate_grid(plan, speed)
    assert (estimate.cells, estimate.renders) == (12, 12)
    assert estimate.seconds == pytest.approx(12 * (3 / speed.it_per_s + speed.overhead_s))
    assert "12 cells" in estimate.describe() and "it/s" in estimate.describe()
    check_cell_limit(plan, limit=12)
    with pytest.raises(CellLimitExceeded, match="12 cells exceed the limit of 10. Confirm") as error:
        check_cell_limit(plan, limit=10)
    assert (error.value.cells, error.value.limit) == (12, 10)
    check_cell_limit(plan, limit=10, confirmed=True)


def test_cancel_stops_between_cells_and_gives_the_model_back(sd1, single_thread):
    render = adapter_renderer(sd1)
    base = _pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 9, SETTINGS.render))
    live = random_live_lora(sd1, seed=6)
    cancel = threading.Event()
    seen = []

    def on_cell(cell_result, done, total):
        seen.append((done, total))
        if done == 2:
            cancel.set()

    result = _grid(sd1, [LiveSnapshot(live)], strengths=(0.5, 1.0), seeds=(1, 2), cancel=cancel, on_cell=on_cell)
    assert result.cancelled and result.image is None
    assert len(result.cells) == 2 and seen == [(1, 4), (2, 4)]
    assert not live.applied
    assert np.array_equal(_pixels(render(SETTINGS.prompt, SETTINGS.negative_prompt, 9, SETTINGS.render)), base)


def test_render_error_takes_the_lora_off(sd1):
    live = random_live_lora(sd1, seed=7)
    settings = GridSettings("p", RenderSettings(width=32, height=32, steps=2, sampler="no such sampler"))
    plan = plan_grid(settings, strength_axis((1.0,)), snapshot_axis([LiveSnapshot(live)]), seed_axis((1,)))
    with pytest.raises(ValueError, match="no such sampler.*unknown. Use one of: Euler, Euler a"):
        run_grid(plan, sd1, adapter_renderer(sd1))
    assert not live.applied
