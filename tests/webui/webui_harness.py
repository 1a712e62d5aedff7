"""A real AUTOMATIC1111 WebUI for the tests in this folder (`webui_harness`): install the extension, tiny checkpoints, start, call.

Environment:
- `A1111_DIR` (required): the WebUI checkout (v1.10.x). Without it every test here is skipped.
- `A1111_PYTHON`: the WebUI's Python, defaults to `$A1111_DIR/venv/bin/python`.
- `A1111_URL` + `A1111_LOG`: use a WebUI that is already running (started with `--api --loglevel DEBUG`, log
  written to A1111_LOG, this extension and the tiny checkpoints below already installed); otherwise one is started
  on a free port with the CPU flags below and stopped afterwards.
Everything written into the WebUI folder (extension link, checkpoint links, a test-only preload extension that
registers the tiny SDXL OpenCLIP config, LoRA files) is removed again.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAMP = time.strftime("%H%M%S")  # file names of this session's checkpoints and LoRAs
EXTENSION_NAME = "sd-webui-lora-trainer"
PRELOAD_NAME = "lora-trainer-test-openclip"
CPU_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
             "--no-download-sd-model", "--do-not-download-clip", "--use-cpu", "all", "--no-half",
             "--precision", "full", "--api", "--loglevel", "DEBUG"]
PRELOAD = '''import open_clip

open_clip.add_model_config({folder!r})


def preload(parser):
    pass
'''


def decode_png(data: str):
    """A base64 PNG as a float numpy array (H, W, 3)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(float)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebUI:
    """A WebUI process (started here or given) and the calls the tests make.

    Args:
        url (str): base URL.
        log (Path): its log file (DEBUG level).
        process (subprocess.Popen, optional): set when started here.
    """

    def __init__(self, url: str, log: Path, process=None):
        self.url, self.log, self.process = url.rstrip("/"), Path(log), process

    def call(self, path: str, body=None, timeout: float = 600):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def log_lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()

    def use_checkpoint(self, title: str) -> None:
        if self.call("/sdapi/v1/options")["sd_model_checkpoint"].split(" ")[0] != title:
            self.call("/sdapi/v1/options", {"sd_model_checkpoint": title})

    def txt2img(self, prompt: str, seed: int = 1):
        import numpy as np
        from PIL import Image

        out = self.call("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 4, "width": 64, "height": 64,
                                              "seed": seed})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0])))).astype(float)

    def generate(self, body: dict, path: str = "/sdapi/v1/txt2img"):
        """POST a generation (txt2img, or our grid route with path=...); returns (answer, decoded images)."""
        out = self.call(path, body)
        return out, [decode_png(image) for image in out.get("images", [])]

    def train(self, config: dict, timeout: float = 900) -> dict:
        """Start a run through our API and poll its status until it ends; returns the last status."""
        self.call("/lora_trainer/v1/train/start", {"config": config})
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.call("/lora_trainer/v1/train/status")
            if status["state"] in ("finished", "stopped", "failed"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"training did not end within {timeout} s: {status}")

    def tool(self, name: str, body: dict, timeout: float = 600) -> dict:
        """Run one of our LoRA tools through its route (`/lora_trainer/v1/tools/<name>`); returns its report."""
        return self.call(f"/lora_trainer/v1/tools/{name}", body, timeout)

    def lora_names(self) -> set[str]:
        return {entry["name"] for entry in self.call("/sdapi/v1/loras")}

    def loaded_weights_lines(self, since: int) -> list[str]:
        """Log lines since line `since` that show the WebUI (re)loading or unloading a model."""
        marks = ("Loading weights", "Model loaded in", "Unloading", "Reusing loaded model")
        return [line for line in self.log_lines()[since:] if any(mark in line for mark in marks)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Installation:
    """What the tests put into the WebUI folder, and takes out again."""

    def __init__(self, a1111_dir: Path):
        self.dir = a1111_dir
        self.created: list[Path] = []

    def link(self, target: Path, link: Path) -> None:
        if link.is_symlink() or link.exists():
            return  # already installed by the user: leave it
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        self.created.append(link)

    def write(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.created.append(path)

    def install_extension(self) -> None:
        self.link(ROOT, self.dir / "extensions" / EXTENSION_NAME)

    def install_checkpoint(self, model, title: str) -> str:
        """Link a tiny model's checkpoint and yaml as `<title>.safetensors` / `.yaml`; returns the file name."""
        folder = self.dir / "models" / "Stable-diffusion"
        self.link(Path(model.checkpoint), folder / f"{title}.safetensors")
        self.link(Path(model.yaml), folder / f"{title}.yaml")
        return f"{title}.safetensors"

    def install_yaml(self, model, checkpoint_name: str) -> None:
        """Link a tiny model's yaml beside a checkpoint written into the WebUI's folder (e.g. by our bake)."""
        folder = self.dir / "models" / "Stable-diffusion"
        self.link(Path(model.yaml), folder / f"{Path(checkpoint_name).stem}.yaml")

    def install_openclip_preload(self, config_folder: Path) -> None:
        self.write(self.dir / "extensions" / PRELOAD_NAME / "preload.py", PRELOAD.format(folder=str(config_folder)))

    def remove(self) -> None:
        for path in reversed(self.created):
            if path.is_symlink() or path.is_file():
                path.unlink()
            if path.parent.name == PRELOAD_NAME and path.parent.exists():
                shutil.rmtree(path.parent)
        self.created.clear()


def install_requirements(python: str) -> str:
    """Run our install.py with the WebUI's Python (installs only what is missing); returns its output."""
    done = subprocess.run([python, str(ROOT / "install.py")], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"install.py failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def start_webui(a1111_dir: Path, python: str, log: Path, checkpoint: str, timeout: float = 600,
                flags=tuple(CPU_FLAGS)) -> WebUI:
    """Start the WebUI on CPU on a free port and wait until the model is loaded (`flags`: its command line)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [python, "launch.py", *flags, "--port", str(port),
            "--ckpt", str(a1111_dir / "models" / "Stable-diffusion" / checkpoint)]
    handle = open(log, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the process's lifetime
    process = subprocess.Popen(args, cwd=a1111_dir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    webui = WebUI(f"http://127.0.0.1:{port}", log, process)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the WebUI exited with {process.returncode}; see {log}:\n"
                               + "\n".join(webui.log_lines()[-30:]))
        text = log.read_text(encoding="utf-8", errors="replace")
        if "Startup time:" in text and "Model loaded in" in text:
            return webui
        time.sleep(1)
    webui.stop()
    raise TimeoutError(f"the WebUI did not load a model within {timeout} s; see {log}")


def webui_python(a1111_dir: Path) -> str:
    return os.environ.get("A1111_PYTHON") or str(a1111_dir / "venv" / "bin" / "python")


def unmatched_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "didn't match keys" in line]


__all__ = ["STAMP", "Installation", "decode_png", "WebUI", "install_requirements", "start_webui", "unmatched_lines", "webui_python"]
