"""The CLI as a careless user or a crash meets it, in real subprocesses: each mistake ends with one message that names
the file or key and the fix, a non-zero exit code and no traceback, before the model loads where no model is needed;
a run killed with SIGKILL mid-save leaves only complete files, and the next run cleans up after it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_trainer.atomic_io import temp_files
from lora_trainer.networks import load_lora
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train.state import state_leftovers

ROOT = Path(__file__).resolve().parents[1]
MODEL_LOADED = "loaded sd1 checkpoint"


def run_cli(*args: str, prefix: list[str] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*prefix, sys.executable, "-m", "lora_trainer", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def write_config(path: Path, tiny, dataset, output, **values) -> Path:
    keys = {
        "pretrained_model_name_or_path": str(tiny.checkpoint), "diffusers_config_dir": str(tiny.config_dir),
        "tokenizer_dir": str(tiny.tokenizer_dir), "train_data_dir": str(dataset), "output_dir": str(output),
        "output_name": "t", "resolution": "64,64", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3,
        "max_train_steps": 2, "train_batch_size": 1, "cache_latents": True, "seed": 7,
    }
    keys.update(values)
    lines = []
    for key, value in keys.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\0", "\\u0000")
            lines.append(f'{key} = "{escaped}"')
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_one_clear_error(done: subprocess.CompletedProcess, *expected: str, code: int | None = None,
                           before_model: bool = True) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    if code is not None:
        assert done.returncode == code, output
    assert "Traceback" not in output, output
    assert done.stderr.count("error:") == 1, output
    for text in expected:
        assert text in done.stderr, output
    if before_model:
        assert MODEL_LOADED not in output, "this mistake needs no model: it must be found before the model loads"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("data"), folder="2_sq", count=2)


@pytest.fixture
def config(tiny_sd1, dataset, tmp_path):
    def make(**values) -> Path:
        return write_config(tmp_path / "run.toml", tiny_sd1, dataset, tmp_path / "out", **values)
    return make


def test_missing_config_file(tmp_path):
    done = run_cli("train", "--config", str(tmp_path / "nope.toml"))
    assert_one_clear_error(done, f"{tmp_path / 'nope.toml'}: config file not found", code=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present here")
def test_cuda_device_on_a_cpu_torch(config):
    done = run_cli("train", "--config", str(config()), "--device", "cuda")
    assert_one_clear_error(done, "--device cuda:", "--device cpu", code=2)


def test_missing_network_weights(config, tmp_path):
    done = run_cli("train", "--config", str(config(network_weights=str(tmp_path / "old.safetensors"))))
    assert_one_clear_error(done, "network_weights:", str(tmp_path / "old.safetensors"), "not found")


def test_output_dir_below_a_regular_file(config, tmp_path):
    (tmp_path / "file").write_text("x")
    done = run_cli("train", "--config", str(config(output_dir=str(tmp_path / "file" / "loras"))))
    assert_one_clear_error(done, "output_dir:", f"{tmp_path / 'file'} is a regular file", code=2)


def test_resume_folder_with_a_corrupt_train_state(config, tmp_path):
    state = tmp_path / "t-state"
    state.mkdir()
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
        (state / name).write_bytes(b"")
    (state / "train_state.json").write_text('{"global_step": ', encoding="utf-8")
    done = run_cli("train", "--config", str(config(resume=str(state))))
    assert_one_clear_error(done, f"{state / 'train_state.json'} is corrupt", "without resume")


def test_demo_with_zero_steps_names_the_option(tmp_path):
    done = run_cli("demo", "--steps", "0", "--out", str(tmp_path / "demo"))
    assert_one_clear_error(done, "--steps 0: must be at least 1", code=2)
    assert "max_train_steps" not in done.stderr, "the user never wrote that key"


def test_missing_dataset_is_found_before_the_model_loads(config, tmp_path):
    done = run_cli("train", "--config", str(config(train_data_dir=str(tmp_path / "no_data"))))
    assert_one_clear_error(done, "train_data_dir:", str(tmp_path / "no_data"))


@pytest.mark.parametrize("name, expected", [("a\0b", "'\\x00'"), ("x" * 300, "300 characters is too long")])
def test_output_name_that_cannot_be_saved(config, name, expected):
    done = run_cli("train", "--config", str(config(output_name=name)))
    assert_one_clear_error(done, "output_name", expected, code=2)


def test_read_only_output_folder_fails_before_any_step(config, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()}); needs root and mount rights")
    try:
        done = run_cli("train", "--config", str(config(output_dir=str(read_only))))
    finally:
        subprocess.run(["umount", str(read_only)], check=False)
    assert_one_clear_error(done, f"output_dir: {read_only} is not writable", "ead-only file system")


def test_missing_vae_file(config, tmp_path):
    done = run_cli("train", "--config", str(config(vae=str(tmp_path / "vae.safetensors"))))
    assert_one_clear_error(done, "vae:", str(tmp_path / "vae.safetensors"), "not found")


def test_huge_rank_is_refused_before_memory_runs_out(config):
    # Beyond the config's range it needs no model at all; within it, the memory estimate (test_preflight) refuses.
    done = run_cli("train", "--config", str(config(network_dim=5_000_000)))
    assert_one_clear_error(done, "network_dim = 5000000", "from 1 to 4096", code=2)


def test_checkpoint_without_read_permission_says_so(tiny_sd1, dataset, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_sd1.checkpoint, checkpoint)
    checkpoint.chmod(0)
    config = write_config(tmp_path / "run.toml", tiny_sd1, dataset, tmp_path / "out",
                          pretrained_model_name_or_path=str(checkpoint))
    done = run_cli("train", "--config", str(config), prefix=_without_root_file_access())
    assert_one_clear_error(done, str(checkpoint), "permission denied", "chmod")
    assert "not a valid safetensors" not in done.stderr and "download" not in done.stderr


def _without_root_file_access() -> list[str]:
    """A command prefix under which a file of mode 000 cannot be read: root's file-access capabilities dropped."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    try:
        subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot drop root's file-access capabilities with setpriv here ({exc}), so root reads any file")
    return prefix


# -- SIGKILL during a save, then resume ---------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[Path]:
    partial, orphans = state_leftovers(folder, "t")
    return temp_files(folder, "t") + partial + orphans


def _kill_during_a_save(proc: subprocess.Popen, out: Path, limit_s: float = 120) -> list[Path]:
    """Watch the output folder and SIGKILL the run while a save is half-written (once a complete state exists)."""
    deadline = time.monotonic() + limit_s
    seen: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("t-step*-state")):
            seen = _leftovers(out)
            if seen:
                break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return seen


def test_sigkill_during_a_save_leaves_complete_files_and_resume_cleans_up(config, tmp_path):
    out = tmp_path / "out"
    path = config(max_train_steps=400, save_every_n_steps=1, save_state=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", str(path)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = _kill_during_a_save(proc, out)
    assert proc.returncode == -signal.SIGKILL

    for lora in out.glob("t*.safetensors"):  # every visible LoRA is whole (atomic saves)
        state_dict, _ = load_lora(lora)
        assert state_dict
    states = sorted(out.glob("t-step*-state"))
    assert states, "the run was killed before its first complete save"
    left_now = _leftovers(out)

    step = int(states[-1].name[len("t-step"):-len("-state")])
    resumed = run_cli("train", "--config", str(config(max_train_steps=step + 1, resume=str(states[-1]))))

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _leftovers(out) == []
    for leftover in left_now:
        assert str(leftover) in resumed.stderr, "each leftover is named when it is cleaned"
    assert (out / "t.safetensors").is_file()
    print(f"killed during a save: {bool(caught)} ({len(left_now)} leftover(s): {[p.name for p in left_now]})")
    if not caught:
        pytest.xfail("the kill did not land inside a save this time (the saves' atomicity was still checked)")
