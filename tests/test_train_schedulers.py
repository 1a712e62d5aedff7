"""Learning-rate schedules give the values of their formulas at chosen steps."""
from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.train.optimizers import build_optimizer, current_lr
from lora_trainer.train.schedulers import build_scheduler, resolve_warmup_steps

LR, TOTAL, WARM = 1.0, 100, 10


def _lrs(name, warmup=WARM, cycles=1, power=1.0, steps=(0, 5, 10, 40, 70, 99)):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=LR)
    sched = build_scheduler(name, opt, TOTAL, warmup, cycles, power)
    out, step = {}, 0
    for target in steps:
        while step < target:
            opt.step()
            sched.step()
            step += 1
        out[target] = opt.param_groups[0]["lr"]
    return out


def _progress(s):
    return (s - WARM) / (TOTAL - WARM)


def test_constant_ignores_warmup():
    assert set(_lrs("constant").values()) == {LR}


def test_constant_with_warmup():
    lrs = _lrs("constant_with_warmup")
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == lrs[99] == LR


def test_linear():
    lrs = _lrs("linear")
    assert lrs[5] == pytest.approx(0.5)
    for s in (10, 40, 70, 99):
        assert lrs[s] == pytest.approx(LR * (1 - _progress(s)))


def test_cosine():
    lrs = _lrs("cosine")
    for s in (10, 40, 70, 99):
        assert lrs[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * _progress(s))))


def test_cosine_with_restarts():
    lrs = _lrs("cosine_with_restarts", cycles=3)
    for s in (40, 70, 99):
        frac = (3 * _progress(s)) % 1.0
        assert lrs[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * frac)))
    assert lrs[40] > lrs[70] or lrs[70] > lrs[99]  # restarts make it non-monotonic overall


def test_polynomial():
    lrs = _lrs("polynomial", power=2.0)
    lr_end = 1e-7  # diffusers' default end lr
    for s in (40, 70, 99):
        assert lrs[s] == pytest.approx((LR - lr_end) * (1 - _progress(s)) ** 2 + lr_end)


def test_warmup_ratio():
    assert resolve_warmup_steps(0.05, 1000) == 50
    assert resolve_warmup_steps(50, 1000) == 50
    assert _lrs("linear", warmup=0.1)[5] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        resolve_warmup_steps(-1, 10)


def test_unknown_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_scheduler: unknown schedule 'cosinus'"):
        build_scheduler("cosinus", opt, 10)


def test_relative_step_adafactor_gets_its_own_schedule():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_optimizer("Adafactor", [p], 1e-4, [])
    sched = build_scheduler("cosine", opt, 10)
    (p ** 2).sum().backward()
    opt.step()
    sched.step()
    assert type(sched).__name__ == "AdafactorSchedule"
    assert 0 < current_lr(opt, sched) < 1
    sched.load_state_dict(sched.state_dict())
