"""How fast `python -m lora_trainer train` refuses common mistakes, against a run that gets as far as its first step.

Each case is a real CLI subprocess on a tiny SD1 model; the figure is wall time from start to exit. Mistakes that need
no model should end in well under a second plus Python's start; the first-step figure shows what they save.

    python benchmarks/fail_fast.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_trainer.testing.datasets import write_square_dataset  # noqa: E402
from lora_trainer.testing.tiny_models import build_tiny_model  # noqa: E402


def run(config: Path, *overrides: str) -> tuple[float, int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "lora_trainer", "train", "--config", str(config), "--device", "cpu"]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return time.perf_counter() - start, done.returncode, last


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny_model("sd1", root / "model", seed=0)
        data = write_square_dataset(root / "data")
        (root / "file").write_text("x")
        config = root / "run.toml"
        config.write_text(
            f'pretrained_model_name_or_path = "{tiny.checkpoint}"\ndiffusers_config_dir = "{tiny.config_dir}"\n'
            f'tokenizer_dir = "{tiny.tokenizer_dir}"\ntrain_data_dir = "{data}"\noutput_dir = "{root / "out"}"\n'
            'output_name = "t"\nresolution = "64,64"\nmax_train_steps = 1\ncache_latents = true\n', encoding="utf-8")
        cases = {
            "output_name of 300 characters": [f"output_name={'x' * 300}"],
            "output_dir below a file": [f"output_dir={root / 'file' / 'out'}"],
            "missing network_weights": [f"network_weights={root / 'none.safetensors'}"],
            "missing train_data_dir": [f"train_data_dir={root / 'none'}"],
            "rank too large for memory": ["network_dim=5000000"],
            "a whole 1-step run": [],
        }
        print(f"{'case':32} {'seconds':>8}  exit  message")
        for name, overrides in cases.items():
            seconds, code, last = run(config, *overrides)
            print(f"{name:32} {seconds:8.2f}  {code:4d}  {last[:90]}")


if __name__ == "__main__":
    main()
