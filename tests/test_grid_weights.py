"""The module-weights axis of a grid: "UNet only" is the LoRA without its text-encoder part, block-weight presets
render as the file the `lbw` tool bakes, and the axis lays out and labels like the others."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.grids import (
    FileSnapshot, GridSettings, RenderSettings, adapter_renderer, parse_weights, plan_grid, run_grid, seed_axis,
    snapshot_axis, strength_axis, weights_axis,
)
from lora_trainer.networks import load_lora, save_lora
from lora_trainer.tools import read_lora, resolve_weights
from lora_trainer.tools.block_weights import weighted_state_dict
from test_grid_api import trained  # noqa: F401  (a JobManager whose last run trained a tiny LoRA)
from test_grids import random_live_lora, sd1  # noqa: F401  (the module's adapter fixture)

SETTINGS = GridSettings("square, red", RenderSettings(width=32, height=32, steps=3, sampler="Euler"), "blurry")


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _by_label(result) -> dict:
    """Cell images by (strength, weights label) of a one-seed grid."""
    return {(c.cell.strength, c.cell.weights.label if c.cell.weights else None): _pixels(c.image)
            for c in result.cells}


@pytest.fixture(scope="module")
def full_file(sd1, tmp_path_factory):  # noqa: F811
    live = random_live_lora(sd1, seed=6)
    return live.save(tmp_path_factory.mktemp("weights") / "both.safetensors", dtype=torch.float32)


def _recording(adapter, states: list):
    render = adapter_renderer(adapter)

    def recorded(prompt, negative, seed, settings):
        states.append(settings.lora_state)
        return render(prompt, negative, seed, settings)
    return recorded


def test_unet_only_is_the_lora_without_its_text_encoder_part(sd1, full_file, tmp_path, single_thread):  # noqa: F811
    state_dict, metadata = load_lora(full_file)
    unet_file = tmp_path / "unet.safetensors"
    save_lora(unet_file, {k: v for k, v in state_dict.items() if k.startswith("lora_unet_")}, metadata)
    assert any(k.startswith("lora_te_") for k in state_dict)

    states: list[str] = []
    plan = plan_grid(SETTINGS, strength_axis((0.0, 0.8)), snapshot_axis([FileSnapshot(full_file)]), seed_axis((7,)),
                     weights=weights_axis(["UNet + TE", "UNet only"]))
    assert (plan.x.kind, plan.y.kind, plan.z.kind) == ("strength", "weights", "snapshot")
    assert plan.y.labels == ("Weights: UNet + TE", "Weights: UNet only") and plan.renders() == 3
    cells = _by_label(run_grid(plan, sd1, _recording(sd1, states)))
    plain = run_grid(plan_grid(SETTINGS, strength_axis((0.8,)), snapshot_axis([FileSnapshot(unet_file)]),
                               seed_axis((7,))), sd1, adapter_renderer(sd1))
    assert np.array_equal(cells[(0.8, "UNet only")], _pixels(plain.cells[0].image))
    assert not np.array_equal(cells[(0.8, "UNet only")], cells[(0.8, "UNet + TE")]), "the text encoder part acts"
    assert len(set(states)) == len(states), "each cell keys the host's conditioning cache on its own LoRA state"
    whole = run_grid(plan_grid(SETTINGS, strength_axis((0.8,)), snapshot_axis([FileSnapshot(full_file)]),
                               seed_axis((7,))), sd1, adapter_renderer(sd1))
    assert np.array_equal(cells[(0.8, "UNet + TE")], _pixels(whole.cells[0].image))


def test_block_weight_presets_render_as_the_baked_file(sd1, full_file, tmp_path, single_thread):  # noqa: F811
    lora = read_lora(full_file)
    baked, _ = weighted_state_dict(lora, resolve_weights("OUTD", "sd1"))
    save_lora(tmp_path / "outd.safetensors", {k: v.float() for k, v in baked.items()}, lora.metadata)
    plan = plan_grid(SETTINGS, strength_axis((0.0, 1.0)), snapshot_axis([FileSnapshot(full_file)]), seed_axis((7,)),
                     weights=weights_axis(["ALL", "NONE", "OUTD"]))
    assert plan.y.labels == ("Weights: ALL", "Weights: NONE", "Weights: OUTD")
    assert plan.describe()["axes"]["y"] == {"kind": "weights", "labels": list(plan.y.labels)}
    cells = _by_label(run_grid(plan, sd1, adapter_renderer(sd1)))
    base = cells[(0.0, "ALL")]
    assert np.array_equal(cells[(1.0, "NONE")], base), "every block at 0 is the base model"
    whole = run_grid(plan_grid(SETTINGS, strength_axis((1.0,)), snapshot_axis([FileSnapshot(full_file)]),
                               seed_axis((7,))), sd1, adapter_renderer(sd1))
    assert np.array_equal(cells[(1.0, "ALL")], _pixels(whole.cells[0].image))
    file_cells = run_grid(plan_grid(SETTINGS, strength_axis((1.0,)),
                                    snapshot_axis([FileSnapshot(tmp_path / "outd.safetensors")]), seed_axis((7,))),
                          sd1, adapter_renderer(sd1))
    outd = cells[(1.0, "OUTD")]
    assert np.abs(outd - _pixels(file_cells.cells[0].image)).max() <= 1
    assert not np.array_equal(outd, base) and not np.array_equal(outd, cells[(1.0, "ALL")])


def test_weights_values_and_layouts_are_checked(sd1, full_file):  # noqa: F811
    assert parse_weights("unet only").unet_only and parse_weights("unet + te").label == "UNet + TE"
    assert parse_weights("1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1").vector[-1] == 1.0
    with pytest.raises(ConfigError, match="preset 'FANCY': unknown. Known presets: ALL, ALL0.5"):
        parse_weights("FANCY")
    with pytest.raises(ConfigError, match="weights 1,0,1: 3 values; block-weight vectors have 12, 17, 20, 26"):
        parse_weights("1,0,1")
    with pytest.raises(ConfigError, match="repeats a value"):
        weights_axis(["UNet only", "unet only"])
    sdxl_vector = parse_weights(",".join(["1"] * 12))
    with pytest.raises(ValueError, match="12 values do not fit a SD1/SD2 LoRA"):
        sdxl_vector.factor("lora_unet_down_blocks_0_attentions_0_proj_in", "sd1")
    axes = (strength_axis((0.0, 1.0)), snapshot_axis([FileSnapshot(full_file)]), seed_axis((1, 2)))
    with pytest.raises(ConfigError, match="layout: seed has 2 values but no place"):
        plan_grid(SETTINGS, *axes, weights=weights_axis(["ALL", "OUTD"]), layout=("strength", "weights", "snapshot"))
    plan = plan_grid(SETTINGS, *axes, weights=weights_axis(["UNet only"]))
    assert (plan.x.kind, plan.y.kind, plan.z.kind) == ("strength", "seed", "snapshot")
    assert all(c.weights.unet_only for c in plan.cells)  # one value: every cell uses it


def test_the_grid_route_panel_form_and_cli_take_weights(trained, full_file, tiny_sd1, capsys,  # noqa: F811
                                                        single_thread):
    import json

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from PIL import Image

    from lora_trainer.__main__ import main
    from lora_trainer.grids import PNG_GRID_KEY
    from lora_trainer.host.a1111_api import GRID_ROUTE, GridApi
    from lora_trainer.host.grid_service import IN_MEMORY, GridService
    from lora_trainer.ui.test_actions import cell_caption, request_from_form

    app = FastAPI()
    GridApi(GridService(trained)).register(app)
    client = TestClient(app)
    body = {"prompt": "dot", "strengths": [1], "seeds": [1], "snapshots": [IN_MEMORY], "width": 32, "height": 32,
            "steps": 1, "sampler_name": "Euler", "weights": ["UNet + TE", "UNet only"]}
    answer = client.post(GRID_ROUTE, json=body)
    assert answer.status_code == 200, answer.text
    cells = answer.json()["cells"]
    assert [(c["weights"], c["y"]) for c in cells] == [("UNet + TE", 0), ("UNet only", 1)]
    assert answer.json()["parameters"]["axes"]["y"]["labels"] == ["Weights: UNet + TE", "Weights: UNet only"]
    bad = client.post(GRID_ROUTE, json={**body, "weights": ["FANCY"]})
    assert bad.status_code == 400 and "preset 'FANCY': unknown" in bad.text

    request = request_from_form("dot", "", "Euler", 1, 7, 32, 32, "1", "1", [IN_MEMORY], False, "UNet only\n\nOUTD\n")
    assert request.weights == ("UNet only", "OUTD")
    plan = GridService(trained).plan(request)
    assert cell_caption(plan.cells[0]) == "in memory, strength 1, UNet only, seed 1"

    assert main(["grid", str(full_file), "--checkpoint", str(tiny_sd1.checkpoint), "--config-dir",
                 str(tiny_sd1.config_dir), "--tokenizer-dir", str(tiny_sd1.tokenizer_dir), "--device", "cpu",
                 "--width", "32", "--height", "32", "--steps", "1", "--strengths", "1", "--seeds", "1",
                 "--prompt", "dot", "--weights", "UNet only", "--weights", "OUTD",
                 "--out", str(full_file.parent / "w.png")]) == 0
    assert "strength 1, UNet only, seed 1" in capsys.readouterr().out
    data = json.loads(Image.open(full_file.parent / "w.png").text[PNG_GRID_KEY])
    assert data["axes"]["y"] == {"kind": "weights", "labels": ["Weights: UNet only", "Weights: OUTD"]}
