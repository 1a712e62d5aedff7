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

With `--start forge,reforge` it starts each Forge host itself, one after the other (the harness of tests/forge:
`FORGE_DIR`/`FORGE_PYTHON`, `REFORGE_DIR`/`REFORGE_PYTHON`), on the full-size random SD1.5-architecture checkpoint
(`LORA_TRAINER_RANDOM_MODELS` or --cache-dir) at 64 px, and measures in the same run what training from the
checkpoint file costs (TrainTrain's approach: a second copy loaded from disk through diffusers): our standalone
trainer on the same file, config and dataset, in a process that has imported torch and this package already, timed
from the call to the first step, with its peak RSS growth over the RSS it had before the call.

       python benchmarks/host_start.py --start forge,reforge --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "HOST_START_RESULT "


def call(url: str, path: str, body=None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:  # the route's message says what is wrong
        raise SystemExit(f"{path}: HTTP {error.code}: {error.read().decode(errors='replace')}") from error


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # the process has ended
        return float("nan")
    for line in lines:
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


def run_config(data: Path, out: Path, steps: int, resolution: int) -> dict:
    """The run both ways train: a rank-4 UNet LoRA, no latent caching (so no caching phase is timed)."""
    return {"train_data_dir": str(data), "resolution": f"{resolution},{resolution}", "output_dir": str(out),
            "output_name": "host_start_bench", "max_train_steps": steps, "network_dim": 4, "network_alpha": 4,
            "cache_latents": False, "network_train_unet_only": True, "save_precision": "float", "seed": 1}


def time_to_first_step(url: str, pid: int, data: Path, out: Path, steps: int, resolution: int) -> dict:
    config = run_config(data, out, steps, resolution)
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


# -- training from the checkpoint file instead (TrainTrain's approach) ----------------------------------------------
def from_disk_child(spec: str) -> None:
    """In a child process: import what a WebUI has imported already, then time our standalone trainer loading the
    checkpoint file and training; print one `HOST_START_RESULT {json}` line."""
    import torch

    from lora_trainer.cli.train import train
    from lora_trainer.config import config_from_dict
    from lora_trainer.train import Step

    values = json.loads(spec)
    config = config_from_dict(values).config
    marks: dict = {}

    def on_event(event) -> None:
        if isinstance(event, Step) and "first_step_s" not in marks:
            marks.update(first_step_s=time.perf_counter() - t0, rss_first_step_mb=rss_mb(os.getpid()))

    rss_before = rss_mb(os.getpid())
    t0 = time.perf_counter()
    train(config, "cpu", extra_subscribers=[on_event], threads=torch.get_num_threads())
    print(RESULT_PREFIX + json.dumps({"rss_before_mb": rss_before, "run_s": time.perf_counter() - t0, **marks}),
          flush=True)


def time_from_disk(checkpoint: Path, data: Path, out: Path, steps: int, resolution: int) -> dict:
    """Run `from_disk_child` and sample its RSS: seconds from the call to the first step, peak RSS growth."""
    spec = dict(run_config(data, out, steps, resolution), pretrained_model_name_or_path=str(checkpoint),
                output_name="host_start_from_disk")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, __file__, "--from-disk-child", json.dumps(spec)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakRss(child.pid) as peak:
        output = child.communicate()[0]
    line = next((x for x in output.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if child.returncode != 0 or line is None:
        raise SystemExit(f"training from the checkpoint file failed ({child.returncode}):\n{output[-3000:]}")
    result = json.loads(line[len(RESULT_PREFIX):])
    return dict(result, rss_peak_mb=peak.peak_mb)


# -- Forge hosts started here -------------------------------------------------------------------------------------
def measure_started_host(name: str, checkpoint: Path, data: Path, work: Path, args) -> list[dict] | None:
    """Start the Forge-family host `name` with the checkpoint, time `args.repeats` in-place runs, stop it."""
    sys.path.insert(0, str(ROOT / "tests" / "forge"))
    from host_harness import FORGE_CPU_FLAGS, STAMP, HostSetup, Installation, start_host

    # the tests' flags without their DEBUG log level, which makes the handshake hash every weight before and after
    flags = [flag for flag in FORGE_CPU_FLAGS if flag not in ("--loglevel", "DEBUG")]
    setup = HostSetup.from_env(name, flags)
    if setup.skip_reason:
        print(f"{name}: skipped ({setup.skip_reason})")
        return None
    title = f"lt_bench_sd1_{STAMP}"
    install, host = Installation(setup.dir), None
    try:
        install.install_extension()
        install.link(checkpoint, setup.dir / "models" / "Stable-diffusion" / f"{title}.safetensors")
        host = start_host(setup, work / f"{name}.log")
        host.use_checkpoint(f"{title}.safetensors")
        host.call("/sdapi/v1/txt2img", {"prompt": "box", "steps": 1, "width": 64, "height": 64})  # loads it
        pid = host.process.pid
        return [time_to_first_step(host.url, pid, data, work / f"{name}_out", args.steps, args.resolution)
                for _ in range(args.repeats)]
    finally:
        if host is not None:
            host.stop()
        install.remove()


def compare_started_hosts(args) -> None:
    """Every host of `--start` in place, then training from the checkpoint file, printed side by side."""
    sys.path.insert(0, str(ROOT))
    from lora_trainer.testing.random_models import build_random_model

    cache = Path(os.environ.get("LORA_TRAINER_RANDOM_MODELS") or args.cache_dir
                 or Path.home() / ".cache" / "lora_trainer" / "benchmarks")
    checkpoint = Path(build_random_model("sd1", cache).checkpoint)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; full-size random SD1.5 {checkpoint.name}, "
          f"{args.resolution} px, {args.steps} steps, rank 4, UNet only, no latent caching")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or tiny_dataset(work / "data")
        for name in filter(None, args.start.split(",")):
            runs = measure_started_host(name.strip(), checkpoint, data, work, args)
            rows += [(f"{name} in place", run) for run in runs or ()]
        rows += [("from the checkpoint file", time_from_disk(checkpoint, data, work / "disk_out", args.steps,
                                                               args.resolution)) for _ in range(args.repeats)]
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print(f"{'way':<28}{'start -> first step':>20}{'whole run':>11}{'peak RSS growth':>17}{'RSS kept after':>16}")
    for label, r in rows:
        kept = r["rss_after_mb"] - r["rss_before_mb"] if "rss_after_mb" in r else float("nan")
        print(f"{label:<28}{r['first_step_s']:>18.2f} s{r['run_s']:>9.2f} s"
              f"{r['rss_peak_mb'] - r['rss_before_mb']:>+14.0f} MB{kept:>+13.0f} MB")


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
    parser.add_argument("--start", help="start these Forge hosts here, comma-separated: forge,reforge")
    parser.add_argument("--cache-dir", type=Path, help="folder for the random checkpoint of --start")
    parser.add_argument("--from-disk-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_disk_child:
        return from_disk_child(args.from_disk_child)
    if args.start:
        return compare_started_hosts(args)
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
