"""Every optimizer type builds from kohya names and args, takes a step and changes the parameters."""
from __future__ import annotations

import sys

import pytest
import torch

from lora_trainer.errors import ConfigError, TrainingError
from lora_trainer.train.optimizers import build_optimizer, current_lr, parse_optimizer_args
from lora_trainer.train.schedulers import build_scheduler

CASES = [
    ("AdamW", 1e-3, []),
    ("AdamW8bit", 1e-3, []),
    ("PagedAdamW8bit", 1e-3, []),
    ("Lion8bit", 1e-4, []),
    ("Lion", 1e-4, ["weight_decay=0.01"]),
    ("Prodigy", 1.0, ["decouple=True", "use_bias_correction=True"]),
    ("DAdaptation", 1.0, []),
    ("DAdaptAdam", 1.0, ["decouple=True"]),
    ("Adafactor", 1e-3, ["relative_step=False", "scale_parameter=False", "warmup_init=False"]),
    ("Adafactor", 1e-3, []),
    ("SGDNesterov", 1e-2, []),
    ("adamw", 1e-3, ["betas=0.9,0.99", "weight_decay=0.01"]),
]


def _groups():
    torch.manual_seed(0)
    # bitsandbytes keeps 8-bit state only for tensors with >= 4096 elements; use one that big
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(torch.randn(8))
    return [{"params": [a]}, {"params": [b]}], [a, b]


@pytest.mark.parametrize("name,lr,args", CASES)
def test_each_optimizer_steps_and_changes_parameters(name, lr, args):
    groups, params = _groups()
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(name, groups, lr, args)
    sched = build_scheduler("constant", opt, total_steps=10)
    for _ in range(2):
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for p, b in zip(params, before, strict=True):
        assert not torch.equal(p.detach(), b), f"{name} did not change a parameter"
        assert torch.isfinite(p).all()
    assert current_lr(opt, sched) > 0


def test_args_are_python_literals():
    kw = parse_optimizer_args(["betas=0.9,0.99", "weight_decay=0.01", "relative_step=False", "eps = 1e-8"])
    assert kw == {"betas": (0.9, 0.99), "weight_decay": 0.01, "relative_step": False, "eps": 1e-8}
    with pytest.raises(ConfigError, match="optimizer_args"):
        parse_optimizer_args(["no_equals_sign"])
    with pytest.raises(ConfigError, match="weight_decay"):
        parse_optimizer_args(["weight_decay=abc("])


def test_args_reach_the_optimizer():
    groups, _ = _groups()
    opt = build_optimizer("AdamW", groups, 1e-3, ["betas=0.8,0.9", "weight_decay=0.5"])
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["weight_decay"] == 0.5
    sgd = build_optimizer("SGDNesterov", _groups()[0], 1e-2, [])
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


def test_group_lr_is_kept_and_default_fills_the_rest():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer("AdamW", [{"params": [a], "lr": 5e-5}, {"params": [b]}], 1e-4, [])
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-4]


def test_adafactor_rules():
    a = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_optimizer("Adafactor", [{"params": [a], "lr": 1e-4}], 1e-4, [])
    assert opt.defaults["relative_step"] and opt.param_groups[0]["lr"] is None
    with pytest.raises(ConfigError, match="relative_step=False needs a learning_rate"):
        build_optimizer("Adafactor", [a], 0.0, ["relative_step=False"])
    # warmup_init forces relative_step back on, as in kohya
    opt = build_optimizer("Adafactor", [a], 1e-4, ["relative_step=False", "warmup_init=True"])
    assert opt.defaults["relative_step"]


def test_unknown_names_and_args_are_reported():
    with pytest.raises(ConfigError, match="unknown optimizer 'Adamm'"):
        build_optimizer("Adamm", _groups()[0], 1e-3, [])
    with pytest.raises(ConfigError, match="does not accept"):
        build_optimizer("AdamW", _groups()[0], 1e-3, ["no_such_arg=1"])
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer("AdamW", [{"params": []}], 1e-3, [])


def test_missing_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(TrainingError, match='optimizer_type = "AdamW"'):
        build_optimizer("AdamW8bit", _groups()[0], 1e-3, [])


def test_full_class_path():
    opt = build_optimizer("torch.optim.RMSprop", _groups()[0], 1e-3, ["alpha=0.9"])
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.9


def test_adamw_takes_the_fused_kernel_and_steps_like_the_plain_one():
    torch.manual_seed(0)
    start = [torch.randn(8, 8), torch.randn(8)]
    runs = {}
    for label, args in (("fused", []), ("plain", ["foreach=False"])):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build_optimizer("AdamW", [{"params": params}], 1e-2, args)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            optimizer.step()
        runs[label] = (optimizer.defaults.get("fused"), [p.detach() for p in params])
    assert runs["fused"][0] is True and not runs["plain"][0]
    for a, b in zip(runs["fused"][1], runs["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
