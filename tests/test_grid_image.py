"""The labelled grid image (WebUI X/Y/Z layout), its PNG text, and `python -m lora_trainer grid`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.__main__ import main
from lora_trainer.grids import (
    PNG_GRID_KEY, PNG_PARAMETERS_KEY, draw_labelled_grid, grid_path_beside, parse_numbers, prompt_from_metadata,
    run_snapshot_files, save_grid_png, snapshot_label,
)
from lora_trainer.networks import LoRANetwork, save_lora

CELL = 48
COLORS = {(x, y, z): (40 * x + 20, 60 * y + 30, 100 * z + 50) for x in range(3) for y in range(2) for z in range(2)}


def _dark_pixels(image: Image.Image, box) -> int:
    return int((np.asarray(image.crop(box).convert("L")) < 100).sum())


def test_grid_layout_labels_and_cells_in_place():
    images = {key: Image.new("RGB", (CELL, CELL), color) for key, color in COLORS.items()}
    x_labels, y_labels, z_labels = ["Strength: 0", "Strength: 0.5", "Strength: 1"], ["epoch 1", "epoch 2"], \
        ["Seed: 1", "Seed: 2"]
    grid = draw_labelled_grid(images, x_labels, y_labels, z_labels)
    single = draw_labelled_grid({k: v for k, v in images.items() if k[2] == 0}, x_labels, y_labels, ["Seed: 1"])
    pad_left = CELL * 3 // 4  # row labels take three quarters of a cell, as in the WebUI's grids
    pad_top = single.height - 2 * CELL
    assert single.width == pad_left + 3 * CELL and pad_top > 0
    title = grid.height - single.height
    assert grid.width == 2 * single.width and title > 0  # seeds: sub-grids side by side under their titles
    for (x, y, z), color in COLORS.items():
        left, top = z * single.width + pad_left + x * CELL, title + pad_top + y * CELL
        assert grid.getpixel((left + CELL // 2, top + CELL // 2)) == color
    assert _dark_pixels(grid, (0, 0, grid.width, title)) > 0  # z titles
    for z in range(2):
        assert _dark_pixels(grid, (z * single.width + pad_left, title, (z + 1) * single.width, title + pad_top)) > 0
        assert _dark_pixels(grid, (z * single.width, title + pad_top, z * single.width + pad_left, grid.height)) > 0
    no_rows = draw_labelled_grid({k: v for k, v in images.items() if k[1:] == (0, 0)}, x_labels, [""], ["x"])
    assert no_rows.width == 3 * CELL  # a strip whose labels are all empty is left out


def test_png_text_reads_back(tmp_path):
    data = {"prompt": "mychar, smile", "negative_prompt": "blurry", "steps": 20, "sampler": "Euler a",
            "cfg_scale": 7.0, "width": 64, "height": 64, "clip_skip": 1, "lora": "mychar",
            "axes": {"x": {"kind": "strength", "labels": ["Strength: 0", "Strength: 1"]}}}
    path = save_grid_png(Image.new("RGB", (8, 8)), tmp_path / "g.png", data)
    text = Image.open(path).text
    assert text[PNG_PARAMETERS_KEY] == ("mychar, smile\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                                        "CFG scale: 7.0, Size: 64x64, Clip skip: 1, LoRA: mychar, "
                                        "Grid X: Strength: 0; Strength: 1")
    assert json.loads(text[PNG_GRID_KEY]) == data
    assert grid_path_beside(tmp_path / "mychar.safetensors").name == "mychar-grid-0001.png"
    (tmp_path / "mychar-grid-0001.png").touch()
    assert grid_path_beside(tmp_path / "mychar.safetensors").name == "mychar-grid-0002.png"


def test_values_snapshot_files_and_default_prompt(tmp_path):
    assert parse_numbers("0, 0.25,1", "s") == [0.0, 0.25, 1.0]
    assert parse_numbers("0-1 [5]", "s") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_numbers("0-1 (+0.5)", "s") == [0.0, 0.5, 1.0]
    assert parse_numbers("1, 2", "seeds", integer=True) == [1, 2]
    with pytest.raises(ValueError, match="seeds: 'x' is not a whole number"):
        parse_numbers("1, x", "seeds", integer=True)
    for name in ("a-000001", "a-000002", "a-step00000050", "a", "a_b-000001", "other"):
        (tmp_path / f"{name}.safetensors").touch()
    found = [p.name for p in run_snapshot_files(tmp_path / "a.safetensors")]
    assert found == ["a-step00000050.safetensors", "a-000001.safetensors", "a-000002.safetensors", "a.safetensors"]
    assert run_snapshot_files(tmp_path / "a-000002.safetensors") == run_snapshot_files(tmp_path / "a.safetensors")
    assert [snapshot_label(tmp_path / n) for n in found] == ["step 50", "epoch 1", "epoch 2", "a"]
    metadata = {"ss_tag_frequency": json.dumps({"10_mychar": {"mychar": 12, "smile": 5, "red hair": 9},
                                                "5_other": {"mychar": 3, "hat": 1}})}
    assert prompt_from_metadata(metadata, max_tags=3) == "mychar, red hair, smile"
    assert prompt_from_metadata({}) == ""


def _write_run(tiny, folder):
    from lora_trainer.config import NetworkConfig
    from lora_trainer.models.loading import load_checkpoint_adapter

    adapter = load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir)
    network = LoRANetwork.create(adapter.lora_targets(), NetworkConfig(network_dim=2, network_alpha=2))
    metadata = {"ss_tag_frequency": json.dumps({"3_sq": {"square": 4, "red": 2}})}
    for name, scale in (("sq-000001", 0.1), ("sq", 0.3)):
        with torch.no_grad():
            for param in network.parameters():
                param.copy_(torch.full_like(param, 0.01).normal_(generator=torch.Generator().manual_seed(1)) * scale)
        save_lora(folder / f"{name}.safetensors", network.state_dict_kohya(torch.float16), metadata)
    return folder / "sq.safetensors"


def test_cli_grid_saves_beside_the_lora(tiny_sd1, tmp_path, capsys):
    lora = _write_run(tiny_sd1, tmp_path)
    common = [str(lora), "--checkpoint", str(tiny_sd1.checkpoint), "--config-dir", str(tiny_sd1.config_dir),
              "--tokenizer-dir", str(tiny_sd1.tokenizer_dir), "--device", "cpu", "--width", "32", "--height", "32",
              "--steps", "2", "--sampler", "DPM++ 2M Karras", "--strengths", "0, 1", "--seeds", "1, 2"]
    assert main(["grid", *common, "--run-snapshots", "--max-cells", "7"]) == 2
    assert "8 cells exceed the limit of 7" in capsys.readouterr().out
    assert main(["grid", *common, "--run-snapshots", "--max-cells", "7", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "8 cells (6 renders), about" in out and "it/s" in out
    saved = tmp_path / "sq-grid-0001.png"
    image = Image.open(saved)
    text = image.text
    data = json.loads(text[PNG_GRID_KEY])
    assert data["prompt"] == "square, red" and data["sampler"] == "DPM++ 2M Karras"
    assert data["files"] == ["sq-000001.safetensors", "sq.safetensors"]
    assert [data["axes"][a]["labels"] for a in "xyz"] == [["Strength: 0", "Strength: 1"], ["epoch 1", "sq"],
                                                          ["Seed: 1", "Seed: 2"]]
    assert data["axes"]["x"]["values"] == [0.0, 1.0] and data["axes"]["z"]["values"] == [1, 2]
    assert text[PNG_PARAMETERS_KEY].startswith("square, red\nSteps: 2, Sampler: DPM++ 2M Karras")
    sub_width = 32 * 3 // 4 + 2 * 32
    assert image.width == 2 * sub_width and image.height > 2 * 32
    assert main(["grid", *common, "--sampler", "Eulr"]) == 2
    assert "sampler 'Eulr': unknown. Use one of: Euler, Euler a" in capsys.readouterr().out
