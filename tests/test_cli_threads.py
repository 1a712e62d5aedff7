"""Threads for training on the CPU: one per idle core by the load average, at least one; a count as given."""
from __future__ import annotations

import pytest

from lora_trainer.__main__ import main
from lora_trainer.cli.train import choose_cpu_threads


@pytest.mark.parametrize("cores, load, expected", [
    (2, 0.1, 2),     # idle: every core, as torch's default
    (2, 0.7, 1),     # one core busy
    (2, 9.0, 1),     # a loaded machine: one thread, never none
    (16, 3.2, 13),
])
def test_auto_takes_the_cores_the_load_leaves_idle(cores, load, expected):
    assert choose_cpu_threads("auto", cores, load, environ={}) == expected


def test_a_count_is_kept_and_omp_num_threads_wins_over_auto():
    assert choose_cpu_threads("3", 2, 9.0, environ={}) == 3
    assert choose_cpu_threads("auto", 2, 0.0, environ={"OMP_NUM_THREADS": "1"}) is None


def test_a_bad_count_is_refused_before_anything_loads(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'pretrained_model_name_or_path = "{tmp_path / "none.safetensors"}"\n', encoding="utf-8")
    assert main(["train", "--config", str(config), "--threads", "0"]) != 0
    err = capsys.readouterr().err
    assert "--threads: '0' is not a thread count" in err and "Traceback" not in err
