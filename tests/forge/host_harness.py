"""A real Forge-family WebUI (lllyasviel's Forge; reForge uses the same parts) for the tests in this folder.

Reuses the A1111 harness (`tests/webui/webui_harness.py`: the `WebUI` client, `Installation`, ports, PNG decoding);
what differs for Forge hosts is here: their CPU flags, a start that does not wait for a model (Forge loads it on
the first generation), the full-size random SD1.5-architecture checkpoint their fixed text-encoder configs need, and
log checks for errors of this extension.

Environment:
- `<NAME>_DIR` (e.g. `FORGE_DIR`): the host's checkout; without it the tests skip.
- `<NAME>_PYTHON`: its Python, defaults to `<dir>/venv/bin/python`.
- `LORA_TRAINER_RANDOM_MODELS`: folder caching the random checkpoints between runs (~2 GB SD1, ~7 GB SDXL),
  defaults to pytest's base temp folder.
- `LORA_TRAINER_SD2=1`: also run the SD2 tests (a full-size random SD2 checkpoint with OpenCLIP-H, ~2.6 GB).
- `LORA_TRAINER_SDXL=1`: also run the SDXL tests (a full-size random SDXL checkpoint; the host then peaks near
  24 GB of RSS on the CPU, in the host's own LoRA merge for the txt2img after training).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui"))

from webui_harness import (  # noqa: E402
    STAMP,
    Installation,
    WebUI,
    decode_png,
    free_port,
)

FORGE_CPU_FLAGS = ["--always-cpu", "--api", "--skip-prepare-environment", "--skip-version-check",
                   "--skip-torch-cuda-test", "--skip-python-version-check", "--loglevel", "DEBUG"]
EXTENSION_MARKS = ("/lora_trainer/", "[lora_trainer.")  # a frame in our code, or our logger's line


@dataclass(frozen=True)
class HostSetup:
    """Where a Forge-family host is and how to start it.

    Attributes:
        name (str): "forge" or "reforge" (its env variables are `<NAME>_DIR` / `<NAME>_PYTHON`).
        dir (Path | None): its checkout, None when the env variable is unset.
        python (str): its Python.
        flags (tuple[str, ...]): command-line flags for a CPU run with the API.
    """

    name: str
    dir: Path | None
    python: str
    flags: tuple[str, ...]

    @classmethod
    def from_env(cls, name: str, flags=FORGE_CPU_FLAGS) -> HostSetup:
        raw = os.environ.get(f"{name.upper()}_DIR")
        folder = Path(raw) if raw else None
        python = os.environ.get(f"{name.upper()}_PYTHON") or str((folder or Path(".")) / "venv" / "bin" / "python")
        return cls(name, folder, python, tuple(flags))

    @property
    def skip_reason(self) -> str | None:
        if self.dir is None:
            return (f"{self.name.upper()}_DIR is not set: these tests need a real {self.name} checkout (and "
                    f"{self.name.upper()}_PYTHON, its venv's python); see the README's test section")
        return None


def random_checkpoint(default_folder: Path, arch: str = "sd1") -> Path:
    """A full-size checkpoint of `arch` ("sd1", "sd2" or "sdxl") with random fp16 weights (built once, cached)."""
    from lora_trainer.testing.random_models import build_random_model

    folder = Path(os.environ.get("LORA_TRAINER_RANDOM_MODELS") or default_folder)
    return Path(build_random_model(arch, folder).checkpoint)


OTHER_ARCHITECTURES = {  # the architectures tested besides SD1, each only when asked for (size, memory)
    "sd2": "the SD2 tests build a ~2.6 GB random checkpoint (OpenCLIP-H text encoder)",
    "sdxl": "the SDXL tests build a ~7 GB random checkpoint and the host needs ~24 GB",
}


def architecture_skip_reason(arch: str) -> str | None:
    """Why the tests of `arch` ("sd2", "sdxl") skip: None when `LORA_TRAINER_<ARCH>=1` is set."""
    variable = f"LORA_TRAINER_{arch.upper()}"
    return None if os.environ.get(variable) == "1" else f"{variable}=1 is not set: {OTHER_ARCHITECTURES[arch]}"


@contextlib.contextmanager
def checkpoint_selected(host: WebUI, setup: HostSetup, arch: str, cache: Path, title: str, back_to: str):
    """The running host with the random `arch` checkpoint installed as `title` and selected (one model in memory at
    a time); `back_to` (a checkpoint title) is selected again afterwards and the link taken out. Skips the test
    unless `LORA_TRAINER_<ARCH>=1`."""
    import pytest

    if architecture_skip_reason(arch):
        pytest.skip(architecture_skip_reason(arch))
    install = Installation(setup.dir)
    try:
        install.link(random_checkpoint(cache, arch), setup.dir / "models" / "Stable-diffusion" / f"{title}.safetensors")
        host.call("/sdapi/v1/refresh-checkpoints", {})
        host.use_checkpoint(f"{title}.safetensors")
        yield host
    finally:
        try:  # the host may be gone (killed for memory): the link goes anyway
            host.use_checkpoint(back_to)
        finally:
            install.remove()


def _rss_kib(pid: int, field: str) -> int:
    """VmRSS / VmHWM (peak) of a process, in KiB (0 where /proc has no such field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed_train(host: WebUI, config: dict, label: str, timeout: float = 1800) -> dict:
    """Run training through our API, printing seconds to the first step, per later step and the host's peak RSS.

    Returns:
        dict: the last status.
    """
    rss_before = _rss_kib(host.process.pid, "VmRSS")
    try:  # Linux: reset the peak (VmHWM) so it measures the run, not the host's start
        Path(f"/proc/{host.process.pid}/clear_refs").write_text("5")
    except OSError:
        pass
    started, first_step, deadline = time.time(), None, time.time() + timeout
    host.call("/lora_trainer/v1/train/start", {"config": config})
    while time.time() < deadline:
        status = host.call("/lora_trainer/v1/train/status")
        if first_step is None and (status["step"] or 0) >= 1:
            first_step = time.time() - started
        if status["state"] in ("finished", "stopped", "failed"):
            break
        time.sleep(0.2)
    else:
        raise TimeoutError(f"training did not end within {timeout} s: {status}")
    total, steps = time.time() - started, status["step"] or 0
    per_step = (total - first_step) / (steps - 1) if first_step is not None and steps > 1 else float("nan")
    print(f"{label}: start request -> first step {first_step or float('nan'):.1f} s, then {per_step:.1f} s/step; "
          f"RSS {rss_before / 2**20:.2f} GiB before the run, peak during it "
          f"{_rss_kib(host.process.pid, 'VmHWM') / 2**20:.2f} GiB")
    return status


def start_host(setup: HostSetup, log: Path, timeout: float = 600) -> WebUI:
    """Start the host on a free port and wait until its API answers (the model loads on first use)."""
    import subprocess

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the process's lifetime
    process = subprocess.Popen([setup.python, "launch.py", *setup.flags, "--port", str(port)], cwd=setup.dir,
                               env=env, stdout=handle, stderr=subprocess.STDOUT)
    host = WebUI(f"http://127.0.0.1:{port}", log, process)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{setup.name} exited with {process.returncode}; see {log}:\n"
                               + "\n".join(host.log_lines()[-30:]))
        if "Startup time:" in log.read_text(encoding="utf-8", errors="replace"):
            try:
                host.call("/sdapi/v1/options", timeout=10)
                return host
            except OSError:
                pass
        time.sleep(1)
    host.stop()
    raise TimeoutError(f"{setup.name} did not answer within {timeout} s; see {log}")


def extension_errors(lines: list[str]) -> list[str]:
    """Tracebacks with a frame in this package and its ERROR lines (other extensions' errors, and the host failing to
    read git data of a linked checkout, are not ours)."""
    found, block = [], []
    for line in lines + [""]:
        if line.startswith(("***", "Traceback")) or (block and line.startswith((" ", "\t"))):
            block.append(line)
            continue
        if block and any(mark in "\n".join(block) for mark in EXTENSION_MARKS):
            found.append("\n".join(block))
        block = []
        if "ERROR" in line and any(mark in line for mark in EXTENSION_MARKS):
            found.append(line)
    return found




def _xyz_script(host: WebUI) -> dict:
    return next(s for s in host.call("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])


def xyz_choices(host: WebUI) -> list[str]:
    """The axis labels of the host's txt2img X/Y/Z plot script."""
    return next(a["choices"] for a in _xyz_script(host)["args"] if a["label"] == "X type")


def xyz_plot(host: WebUI, axis: str, values: str, body: dict):
    """A txt2img through the host's X/Y/Z plot script with one X axis (by label), its cells returned too:
    (answer, [grid, cell, ...]). The script's own defaults fill the rest (reForge's script has more arguments)."""
    args = _xyz_script(host)["args"]
    script_args = [arg.get("value") for arg in args]
    script_args[:9] = [xyz_choices(host).index(axis), values, [], 0, "", [], 0, "", []]  # X, Y, Z: type, values
    for position, arg in enumerate(args):
        if arg["label"] in ("Draw legend", "Include Sub Images"):
            script_args[position] = True
    return host.generate({**body, "script_name": "x/y/z plot", "script_args": script_args})

XYZ_AXES = ("LoRA Trainer: strength", "LoRA Trainer: snapshot", "LoRA Trainer: module weights")


def check_xyz_strength_cells(host: WebUI, body: dict, at_0, at_1, base) -> None:
    """Our axes are in the host's X/Y/Z plot, whose strength axis at 0, 1 renders `at_0` and `at_1` (the grid
    route's cells) bit for bit, says so in its infotext and leaves the model as before (`body` renders `base`)."""
    assert set(XYZ_AXES) <= set(xyz_choices(host))
    lines_before = len(host.log_lines())
    answer, images = xyz_plot(host, "LoRA Trainer: strength", "0, 1", body)
    assert len(images) == 1 + 2, "the X/Y/Z grid, then its two cells"
    assert abs(images[1] - at_0).max() == 0 and abs(images[2] - at_1).max() == 0
    assert "LoRA Trainer: in memory at 1" in answer["info"]
    assert abs(host.generate(body)[1][0] - base).max() == 0, "our LoRA is off after the X/Y/Z plot"
    assert extension_errors(host.log_lines()[lines_before:]) == []

def write_box_dataset(folder: Path, images: int = 3) -> Path:
    """A tiny captioned dataset (`<folder>/2_box/*.png|txt`, 64 px); returns `folder`."""
    from PIL import Image, ImageDraw

    sub = folder / "2_box"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        image = Image.new("RGB", (64, 64), (20, 90, 180))
        ImageDraw.Draw(image).rectangle([8 * i, 8, 8 * i + 30, 38], fill=(230, 40, 20))
        image.save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"box, red, item{i}", encoding="utf-8")
    return folder


__all__ = ["OTHER_ARCHITECTURES", "STAMP", "XYZ_AXES", "HostSetup", "Installation", "WebUI",
           "architecture_skip_reason", "check_xyz_strength_cells", "checkpoint_selected", "decode_png",
           "extension_errors", "random_checkpoint", "start_host", "timed_train", "write_box_dataset", "xyz_choices",
           "xyz_plot"]
