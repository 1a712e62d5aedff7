"""Start-up cost of training inside a running WebUI, against reloading the checkpoint from disk.

Measures, on a WebUI with this extension and a model loaded (`--api`):
- seconds from the start request (`POST /lora_trainer/v1/train/start`) to the first finished training step, with
  `cache_latents = false` so no latent-caching phase is included (target: <= 3 s on the tiny model);
- the server process's RSS before the run, at the first step and after the run, against the size of the LoRA, its
  gradients and AdamW state (4 x the LoRA's float32 bytes);
- for comparison (`--other`), what a trainer that reloads the checkpoint pays: loading it from disk again. Forge
  hosts (`--lazy-load`) load a checkpoint only on the next generation, so there the reload is timed as a 1-step
  txt2img after switching checkpoints minus the same txt2img without a switch.

Usage: python benchmarks/host_start.py --url http://127.0.0.1:7861 [--pid PID] [--data DIR] [--steps 3]
       [--other OTHER_CHECKPOINT.safetensors] [--lazy-load]
(the PID is found from the port when not given; a tiny dataset is written when --data is not given).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def call(url: str, path: str, body=None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def find_pid(port: int) -> int:
    """The WebUI process listening on `port` (a `launch.py` whose command line names that port)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd]
        if any(a.endswith(("launch.py", "webui.py")) for a in args) and str(port) in args:
            return int(entry.name)
    raise SystemExit(f"no WebUI process for port {port} found; pass --pid")


def tiny_dataset(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    sub = folder / "1_box"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        image = Image.new("RGB", (64, 64), (20, 90, 180))
        ImageDraw.Draw(image).rectangle([8 * i, 8, 8 * i + 30, 38], fill=(230, 40, 20))
        image.save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"box, item{i}", encoding="utf-8")
    return folder


class PeakRss:
    """The highest RSS of a process while the block runs (sampled every 20 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_to_first_step(url: str, pid: int, data: Path, out: Path, steps: int, resolution: int) -> dict:
    config = {"train_data_dir": str(data), "resolution": f"{resolution},{resolution}", "output_dir": str(out),
              "output_name": "host_start_bench", "max_train_steps": steps, "network_dim": 4, "network_alpha": 4,
              "cache_latents": False, "network_train_unet_only": True, "save_precision": "float", "seed": 1}
    rss_before = rss_mb(pid)
    with PeakRss(pid) as peak:
        t0 = time.perf_counter()
        call(url, "/lora_trainer/v1/train/start", {"config": config})
        status, first, rss_first, ready = poll_run(url, pid, t0)
    total = time.perf_counter() - t0
    if status["state"] != "finished":
        raise SystemExit(f"the run did not finish: {status['message']}")
    lora_bytes = Path(status["lora_path"]).stat().st_size
    return {"ready_s": ready, "first_step_s": first, "run_s": total, "steps": status["step"],
            "rss_before_mb": rss_before, "rss_first_step_mb": rss_first, "rss_peak_mb": peak.peak_mb,
            "rss_after_mb": rss_mb(pid), "lora_mb": lora_bytes / 2**20, "lora_train_state_mb": 4 * lora_bytes / 2**20,
            "lora_path": status["lora_path"]}


def poll_run(url: str, pid: int, t0: float):
    """Poll the run's status until it ends: (last status, first step s, RSS at first step, loop entered s)."""
    first = rss_first = ready = None
    while True:
        status = call(url, "/lora_trainer/v1/train/status")
        if ready is None and status["state"] != "preparing":
            ready = time.perf_counter() - t0
        if first is None and status["step"] >= 1:
            first, rss_first = time.perf_counter() - t0, rss_mb(pid)
        if status["state"] in ("finished", "stopped", "failed"):
            break
        time.sleep(0.02)
    return status, first, rss_first, ready


def reload_checkpoint(url: str, model: str, other: str, lazy: bool = False) -> float:
    """Seconds to load `model` from disk again: switch to `other`, then time switching back (with the WebUI's
    default `sd_checkpoints_limit` of 1 and no checkpoint cache, that reads and builds the model anew). `lazy`
    (Forge): the load happens in the next generation, so time a 1-step txt2img after the switch minus one without."""
    if not lazy:
        call(url, "/sdapi/v1/options", {"sd_model_checkpoint": other})
        t0 = time.perf_counter()
        call(url, "/sdapi/v1/options", {"sd_model_checkpoint": model})
        return time.perf_counter() - t0
    body = {"prompt": "box", "steps": 1, "width": 64, "height": 64, "seed": 1}
    call(url, "/sdapi/v1/options", {"sd_model_checkpoint": other})
    call(url, "/sdapi/v1/txt2img", body)
    call(url, "/sdapi/v1/options", {"sd_model_checkpoint": model})
    t0 = time.perf_counter()
    call(url, "/sdapi/v1/txt2img", body)
    with_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    call(url, "/sdapi/v1/txt2img", body)
    return with_load - (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--other", help="another checkpoint title, for the reload-from-disk comparison")
    parser.add_argument("--lazy-load", action="store_true",
                        help="the host loads checkpoints on the next generation (Forge, reForge)")
    args = parser.parse_args()
    pid = args.pid or find_pid(int(args.url.rsplit(":", 1)[1].split("/")[0]))
    model = call(args.url, "/sdapi/v1/options")["sd_model_checkpoint"]
    print(f"WebUI pid {pid}, model {model}, {os.cpu_count()} CPUs")
    if args.lazy_load:  # the model is loaded by the first generation; the runs measure training on a loaded model
        call(args.url, "/sdapi/v1/txt2img", {"prompt": "box", "steps": 1, "width": 64, "height": 64})
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or tiny_dataset(Path(tmp) / "data")
        runs = [time_to_first_step(args.url, pid, data, Path(tmp) / "out", args.steps, args.resolution)
                for _ in range(args.repeats)]
    for i, r in enumerate(runs, 1):
        print(f"run {i}: start -> training loop entered {r['ready_s']:.2f} s, first step done {r['first_step_s']:.2f} s, whole run {r['run_s']:.2f} s "
              f"({r['steps']} steps); RSS {r['rss_before_mb']:.0f} -> {r['rss_first_step_mb']:.0f} (first step) -> "
              f"{r['rss_after_mb']:.0f} MB after, peak {r['rss_peak_mb']:.0f} MB "
              f"({r['rss_peak_mb'] - r['rss_before_mb']:+.0f}); LoRA {r['lora_mb']:.2f} MB, LoRA+grads+AdamW "
              f"{r['lora_train_state_mb']:.2f} MB")
    best = min(r["first_step_s"] for r in runs)
    growth = runs[-1]["rss_after_mb"] - runs[0]["rss_before_mb"]
    print(f"start -> first step: best {best:.2f} s (target <= 3 s); RSS growth over {len(runs)} runs "
          f"{growth:+.0f} MB")
    if args.other:
        reloads = [reload_checkpoint(args.url, model.split(" ")[0], args.other, args.lazy_load) for _ in range(2)]
        print(f"loading the checkpoint from disk instead: {min(reloads):.2f} s best of {len(reloads)}; "
              f"RSS after {rss_mb(pid):.0f} MB")


if __name__ == "__main__":
    main()
