"""Pure helpers of the loop: kohya file names, pruning, finite-weight guard, step plans, prompt files, precision."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.errors import ConfigError, TrainingError
from lora_trainer.train.checkpoints import check_finite, checkpoint_stem, prune_old_epochs, save_dtype
from lora_trainer.train.events import TrainCommands
from lora_trainer.train.model_state import Precision
from lora_trainer.train.preparation import plan_steps
from lora_trainer.train.samples import SamplePrompt, parse_prompt_line, read_prompt_file


def test_kohya_names():
    assert checkpoint_stem("x", epoch=2) == "x-000002"
    assert checkpoint_stem("x", step=100) == "x-step00000100"
    assert checkpoint_stem("x") == "x"
    assert save_dtype("bf16") is torch.bfloat16 and save_dtype("float") is torch.float32
    assert save_dtype(None) is torch.float16
    with pytest.raises(ConfigError, match="save_precision"):
        save_dtype("fp8")


def test_prune_keeps_the_last_n_epoch_saves(tmp_path):
    for epoch in (2, 4, 6):
        for suffix in (".safetensors", ".toml"):
            (tmp_path / f"x-{epoch:06d}{suffix}").write_text("")
    prune_old_epochs(tmp_path, "x", 6, every=2, keep=2)  # keeps 4 and 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-000004.safetensors", "x-000004.toml", "x-000006.safetensors", "x-000006.toml"]
    prune_old_epochs(tmp_path, "x", 6, every=2, keep=None)
    assert len(list(tmp_path.iterdir())) == 4


def test_check_finite():
    check_finite({"a": torch.ones(2), "n": torch.tensor([1], dtype=torch.int64)}, 3)
    with pytest.raises(TrainingError, match="step 3: LoRA weights hold NaN/inf \\(b"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, 3)


def test_plan_steps():
    plan = plan_steps(batches_per_epoch=5, accumulation=2, max_train_steps=7, max_train_epochs=None)
    assert (plan.steps_per_epoch, plan.total_steps, plan.total_epochs) == (3, 7, 3)
    plan = plan_steps(5, 2, max_train_steps=1600, max_train_epochs=4)  # epochs win, as in kohya
    assert (plan.total_steps, plan.total_epochs) == (12, 4)
    with pytest.raises(ConfigError, match="max_train_steps"):
        plan_steps(5, 1, 0, None)
    with pytest.raises(TrainingError, match="no batch"):
        plan_steps(0, 1, 10, None)


def test_prompt_lines(tmp_path):
    assert parse_prompt_line("  # comment") is None and parse_prompt_line("") is None
    assert parse_prompt_line("a cat, sitting --n blurry, bad --w 512 --h 768 --s 28 --l 6.5 --d 42") == SamplePrompt(
        "a cat, sitting", "blurry, bad", 512, 768, 28, 6.5, 42)
    assert parse_prompt_line("plain") == SamplePrompt("plain")
    with pytest.raises(ConfigError, match="--w 'wide'"):
        parse_prompt_line("x --w wide")
    path = tmp_path / "p.txt"
    path.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_prompt_file(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompt_file(str(tmp_path / "missing.txt"))


def test_precision_cpu_bf16_autocast_and_clipping():
    p = Precision("bf16", torch.device("cpu"))
    assert p.scaler is None
    lin = torch.nn.Linear(4, 4)
    with p.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    (lin(torch.randn(2, 4)) * 1e6).sum().backward()
    p.step(opt, list(lin.parameters()), max_grad_norm=1.0)
    norm = torch.sqrt(sum(q.grad.pow(2).sum() for q in lin.parameters()))
    assert norm == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ConfigError, match="mixed_precision"):
        Precision("fp8", torch.device("cpu"))


def test_commands_are_a_cancel_token():
    commands = TrainCommands()
    assert not commands.cancelled
    commands.request_stop()
    assert commands.cancelled and not commands.save_requested


def test_half_model_weights_get_autocast_even_without_mixed_precision():
    assert Precision("no", torch.device("cpu"), torch.float32).dtype is None
    assert Precision("no", torch.device("cpu"), torch.bfloat16).dtype is torch.bfloat16
    assert Precision("fp16", torch.device("cpu"), torch.bfloat16).dtype is torch.float16
