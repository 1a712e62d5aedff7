"""The snapshot with the lowest validation loss: found from each file's step and the run's validation losses,
named by `train` at the end, marked on the grid's snapshot axis (CLI `grid --validation`, the Test panel's service
and the grid route's answer)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.__main__ import main
from lora_trainer.cli.train import best_snapshot_line
from lora_trainer.errors import ConfigError
from lora_trainer.grids import (
    PNG_GRID_KEY, FileSnapshot, lora_file_step, rank_snapshots, read_validation_csv, snapshot_axis,
)
from lora_trainer.testing.datasets import write_square_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_lowest_loss_at_a_snapshot_step_is_best():
    ranked = rank_snapshots([("epoch 1", 2), ("epoch 2", 4), ("last", 6), ("in memory", 6), ("odd", 5)],
                            {2: 0.30, 4: 0.20, 6: 0.25, 5: 0.10, 3: 0.05})
    assert [(r.label, r.loss, r.best) for r in ranked] == [
        ("epoch 1", 0.30, False), ("epoch 2", 0.20, False), ("last", 0.25, False), ("in memory", 0.25, False),
        ("odd", 0.10, True)]  # step 3 holds the lowest loss, but no snapshot holds step 3
    ranked = rank_snapshots([("epoch 1", 2), ("last", 4), ("in memory", 4), ("unknown", None)], {2: 0.3, 4: 0.2})
    assert [r.note() for r in ranked] == ["val 0.3000", "best val 0.2000", "best val 0.2000", ""]
    assert not any(r.best for r in rank_snapshots([("a", 1)], {2: 0.1}))
    assert not any(r.best for r in rank_snapshots([("a", 1), ("b", 2)], {1: math.nan}))


def test_validation_csv_is_read_and_a_wrong_file_is_named(tmp_path):
    path = tmp_path / "validation.csv"
    path.write_text("step,epoch,loss,loss_red\n2,1,0.5,0.4\n4,2,nan,\n6,3,0.25,0.2\n", encoding="utf-8")
    assert read_validation_csv(path) == {2: 0.5, 6: 0.25}
    path.write_text("step,epoch,lr\n2,1,0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="validation.csv: no 'step' and 'loss' columns"):
        read_validation_csv(path)
    with pytest.raises(FileNotFoundError, match="missing.csv: validation file not found"):
        read_validation_csv(tmp_path / "missing.csv")


def test_axis_notes_follow_the_labels():
    class Snap:
        def __init__(self, label):
            self.label = label

    axis = snapshot_axis([Snap("epoch 1"), Snap("epoch 2")], ["val 0.3000", "best val 0.2000"])
    assert axis.labels == ("epoch 1 (val 0.3000)", "epoch 2 (best val 0.2000)")
    assert snapshot_axis([Snap("epoch 1")]).labels == ("epoch 1",)
    with pytest.raises(ValueError, match="1 notes for 2 snapshots"):
        snapshot_axis([Snap("a"), Snap("b")], ["x"])


def test_train_summary_names_the_best_file():
    line = best_snapshot_line([("a-step1.safetensors", 1), ("a.safetensors", 3)], {1: 0.2, 2: 0.1, 3: 0.3})
    assert line == "best snapshot: a-step1.safetensors (validation loss 0.2000 at step 1)"
    assert best_snapshot_line([("a.safetensors", 3)], {2: 0.1}) == (
        "lowest validation loss 0.1000 at step 2; no file was saved at a validated step")


def _csv_losses(log_dir: Path) -> dict[int, float]:
    (run,) = log_dir.iterdir()
    with (run / "validation.csv").open(encoding="utf-8") as file:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(file)}


def test_cli_train_names_the_best_file_and_the_grid_marks_it(tiny_sd1, tmp_path, capsys):
    data = write_square_dataset(tmp_path / "data", count=6)
    out, logs = tmp_path / "out", tmp_path / "logs"
    config = tmp_path / "run.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_sd1.checkpoint}"\ndiffusers_config_dir = "{tiny_sd1.config_dir}"\n'
        f'tokenizer_dir = "{tiny_sd1.tokenizer_dir}"\ntrain_data_dir = "{data}"\noutput_dir = "{out}"\n'
        f'logging_dir = "{logs}"\noutput_name = "val"\nresolution = "64,64"\nnetwork_dim = 4\nnetwork_alpha = 4\n'
        'learning_rate = 5e-2\nmax_train_steps = 3\nseed = 7\nsave_every_n_steps = 1\nvalidation_split = 0.35\n'
        'validate_every_n_steps = 1\nnetwork_train_unet_only = true\nsave_precision = "float"\n', encoding="utf-8")
    assert main(["train", "--config", str(config), "--device", "cpu"]) == 0
    losses = _csv_losses(logs)
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 3
    files = {1: out / "val-step00000001.safetensors", 2: out / "val-step00000002.safetensors",
             3: out / "val.safetensors"}
    assert {step: lora_file_step(path) for step, path in files.items()} == {1: 1, 2: 2, 3: 3}
    best_step = min(losses, key=losses.get)
    assert f"best snapshot: {files[best_step]} (validation loss {losses[best_step]:.4f} at step {best_step})" in \
        capsys.readouterr().out

    common = [str(files[3]), "--run-snapshots", "--checkpoint", str(tiny_sd1.checkpoint), "--config-dir",
              str(tiny_sd1.config_dir), "--tokenizer-dir", str(tiny_sd1.tokenizer_dir), "--device", "cpu",
              "--width", "32", "--height", "32", "--steps", "1", "--sampler", "Euler", "--strengths", "0, 1",
              "--seeds", "1", "--validation", str(next(logs.iterdir()) / "validation.csv")]
    assert main(["grid", *common]) == 0
    printed = capsys.readouterr().out
    label = FileSnapshot(files[best_step]).label
    assert f"grid: lowest validation loss: {label} ({losses[best_step]:.4f} at step {best_step})" in printed
    data = json.loads(Image.open(out / "val-grid-0001.png").text[PNG_GRID_KEY])
    snapshot_labels = data["axes"]["y"]["labels"]
    expected = [f"{FileSnapshot(files[s]).label} ({'best ' if s == best_step else ''}val {losses[s]:.4f})"
                for s in (1, 2, 3)]
    assert snapshot_labels == expected
    assert data["best_snapshot"] == {"label": label, "step": best_step, "validation_loss": losses[best_step]}


def test_the_test_panel_service_and_the_grid_route_mark_the_best_snapshot(tiny_sd1, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.config import config_from_dict
    from lora_trainer.host import StandaloneHost
    from lora_trainer.host.a1111_api import GRID_ROUTE, GridApi
    from lora_trainer.host.grid_service import IN_MEMORY, GridRequest, GridService
    from lora_trainer.train.job import JobManager
    from lora_trainer.ui.test_actions import best_text

    data = write_square_dataset(tmp_path / "data", count=6)
    config = config_from_dict({
        "pretrained_model_name_or_path": str(tiny_sd1.checkpoint), "diffusers_config_dir": str(tiny_sd1.config_dir),
        "tokenizer_dir": str(tiny_sd1.tokenizer_dir), "train_data_dir": str(data), "output_dir": str(tmp_path / "o"),
        "resolution": "64,64", "output_name": "svc", "max_train_steps": 3, "network_dim": 4, "network_alpha": 4,
        "learning_rate": 0.05, "seed": 7, "save_every_n_steps": 1, "save_precision": "float",
        "validation_split": 0.35, "validate_every_n_steps": 1, "network_train_unet_only": True,
        "ema": True, "ema_decay": 0.9}).config
    manager = JobManager(StandaloneHost(tmp_path / "loras", device="cpu"))
    status = manager.start(config).wait(300)
    assert status.state.value == "finished", status.message
    losses = dict(status.validation_losses)
    best_step = min(losses, key=losses.get)
    labels = {1: "step 1", 2: "step 2", 3: "svc"}
    service = GridService(manager, cell_limit=16)
    best = service.best_snapshot()
    assert (best.label, best.step, best.loss) == (labels[best_step], best_step, losses[best_step])
    assert best_text(best) == f" Lowest validation loss: **{labels[best_step]}** ({losses[best_step]:.4f} at step " \
                              f"{best_step})."
    plan = service.plan(GridRequest("square", strengths=(0.0, 1.0), seeds=(1,), steps=1, width=32, height=32,
                                    sampler_name="Euler"))
    marked = {3: f"val {losses[3]:.4f}"} | {best_step: f"best val {losses[best_step]:.4f}"}
    expected = []
    for step in (1, 2, 3):  # each file, then its EMA file: averaged weights, not what validation measured
        expected += [f"{labels[step]} ({marked.get(step, f'val {losses[step]:.4f}')})", f"{labels[step]} (EMA)"]
    expected += [f"{IN_MEMORY} ({marked[3]})", f"{IN_MEMORY} (EMA)"]  # the LoRA in memory holds the last step
    assert list(plan.y.labels) == expected and plan.describe()["best_snapshot"]["label"] == labels[best_step]

    app = FastAPI()
    GridApi(service).register(app)
    answer = TestClient(app).post(GRID_ROUTE, json={"prompt": "square", "strengths": [0, 1], "seeds": [1],
                                                    "snapshots": ["step 1", IN_MEMORY], "width": 32, "height": 32,
                                                    "steps": 1, "sampler_name": "Euler"})
    assert answer.status_code == 200, answer.text
    shown = {1: losses[1], 3: losses[3]}
    among = min(shown, key=shown.get)  # the best among the snapshots the grid compares
    assert answer.json()["best_snapshot"] == {1: "step 1", 3: IN_MEMORY}[among]
    assert answer.json()["parameters"]["best_snapshot"]["step"] == among


def test_an_ema_file_holds_no_validated_step(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "a.safetensors"), {"ss_steps": "4"})
    save_file(tensors, str(tmp_path / "a-ema.safetensors"), {"ss_steps": "4", "lora_trainer_ema": "{}"})
    assert lora_file_step(tmp_path / "a.safetensors") == 4
    assert lora_file_step(tmp_path / "a-ema.safetensors") is None  # averaged weights: not what validation measured
