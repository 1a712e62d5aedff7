"""Time and peak RSS of the LoRA file tools: merge (exact, SVD) and resize (fixed, dynamic), optionally against
kohya sd-scripts' `svd_merge_lora.py` and `resize_lora.py` on the same files.

Cases:
    tiny_sdxl   LoRA/LoCon-free rank-8 LoRAs on the tiny SDXL model's targets (lora_trainer.testing)
    full_sd1    rank-32 fp16 LoRAs with random weights on every kohya target of full-size SD1 (264 modules)

Every job runs in its own process; "job s" is the job's own wall time (file reading and writing included),
"proc s" the whole process (interpreter start and imports included, as kohya's figure is), the peak RSS the
child's ru_maxrss (wait4). Linux carries the parent's peak RSS over into a child's ru_maxrss at exec, so the
driver never imports torch: building the inputs and measuring "retained" also run in children, and the driver
stays small. "retained" is the share of the Frobenius norm of the exact
result kept by the output, measured with our reader on the written file, so ours and kohya's are measured the
same way. Nothing here asserts a timing; numbers depend on the machine's load.

    python benchmarks/tools_speed.py [--cases tiny_sdxl,full_sd1] [--jobs resize,resize_fro] [--rank 16] [--keep DIR]

Comparison with kohya: set SD_SCRIPTS_DIR to a checkout of kohya-ss/sd-scripts and SD_SCRIPTS_PYTHON to a Python
where its networks/ scripts run; both tools then run on the same inputs in this invocation and the ratios are
printed (targets: ours >= 3x faster at equal or better retained energy). Without them the comparison is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _full_sd1_lora(path: Path, rank: int, seed: int) -> None:
    import torch

    from lora_trainer.networks import save_lora
    from lora_trainer.tools import architecture_modules

    table = architecture_modules("sd1")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(table.lora_targets):
        shape = table.shapes[name]
        down = torch.randn(rank, *shape[1:], generator=g) / shape[1] ** 0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.01
        sd.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                   f"{name}.alpha": torch.tensor(rank / 2.0)})
    save_lora(path, sd, {"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)})


def _tiny_sdxl_loras(folder: Path, paths: list[Path]) -> None:
    from lora_trainer.testing.lora_files import random_lora, tiny_targets
    from lora_trainer.testing.tiny_models import build_tiny_model

    targets = tiny_targets(build_tiny_model("sdxl", folder / "tiny_sdxl"))
    for seed, path in enumerate(paths):
        random_lora(targets, path, dim=8, alpha=4.0, seed=seed, architecture="sdxl")


def retained(out: Path, a: Path, b: Path | None, ratio_b: float) -> float:
    """Share of the exact result's Frobenius norm kept by `out` (for a merge: a + ratio_b * b)."""
    from lora_trainer.tools import read_lora

    result, la = read_lora(out), read_lora(a)
    lb = read_lora(b) if b else None
    total = error = 0.0
    for name in la.modules:
        exact = la.delta(name) + (ratio_b * lb.delta(name) if lb else 0)
        got = result.delta(name) if name in result.modules else exact * 0
        total += float(exact.double().square().sum())
        error += float((got - exact).double().square().sum())
    return max(0.0, 1 - error / total) ** 0.5


JOBS = ("merge_exact", "merge_svd", "resize", "resize_fro")


def run_job(job: str, a: str, b: str, out: str, rank: int) -> dict:
    """One of our jobs, or a helper step of the driver, in this process (what the driver runs in a child)."""
    from lora_trainer.tools import MergeInput, merge_loras, read_lora, resize_lora

    if job.startswith("inputs_"):
        if job == "inputs_full_sd1":
            _full_sd1_lora(Path(a), 32, 1)
            _full_sd1_lora(Path(b), 32, 2)
        else:
            _tiny_sdxl_loras(Path(out), [Path(a), Path(b)])
        return {}
    if job.startswith("retained_"):
        ratio_b = 0.5 if job.startswith("retained_merge") else 0.0
        return {"retained": retained(Path(out), Path(a), Path(b) if ratio_b else None, ratio_b)}
    start = time.perf_counter()
    if job == "merge_exact":
        merge_loras([MergeInput(read_lora(a)), MergeInput(read_lora(b), 0.5)], out)
    elif job == "merge_svd":
        merge_loras([MergeInput(read_lora(a)), MergeInput(read_lora(b), 0.5)], out, rank=rank)
    elif job == "resize":
        resize_lora(read_lora(a), out, rank=rank // 2)
    elif job == "resize_fro":
        resize_lora(read_lora(a), out, dynamic="sv_fro:0.9")
    return {"seconds": time.perf_counter() - start}


def _kohya_command(job: str, a: Path, b: Path, out: Path, rank: int) -> list[str] | None:
    scripts = Path(os.environ["SD_SCRIPTS_DIR"]) / "networks"
    common = ["--save_precision", "float", "--device", "cpu", "--save_to", str(out)]
    if job == "merge_svd":
        return [str(scripts / "svd_merge_lora.py"), "--models", str(a), str(b), "--ratios", "1", "0.5",
                "--new_rank", str(rank), "--precision", "float", *common]
    if job == "resize":
        return [str(scripts / "resize_lora.py"), "--model", str(a), "--new_rank", str(rank // 2), *common]
    if job == "resize_fro":
        return [str(scripts / "resize_lora.py"), "--model", str(a), "--new_rank", "10000", "--dynamic_method",
                "sv_fro", "--dynamic_param", "0.9", *common]
    return None


def _measure(command: list[str], env: dict) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed ({proc.returncode}):\n{output[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, output


def _child(job: str, a: Path, b: Path, out: Path, rank: int, env: dict) -> tuple[dict, float, float]:
    """Run `job` of this script in a child; returns its JSON answer, wall seconds and peak RSS (MiB)."""
    wall, rss, output = _measure([sys.executable, __file__, "--job", job, "--a", str(a), "--b", str(b),
                                  "--out", str(out), "--rank", str(rank)], env)
    return json.loads(output.strip().splitlines()[-1]), wall, rss


def drive(cases: list[str], jobs: list[str], rank: int, folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kohya = bool(os.environ.get("SD_SCRIPTS_DIR") and os.environ.get("SD_SCRIPTS_PYTHON"))
    print(f"kohya comparison: {'on' if kohya else 'off (set SD_SCRIPTS_DIR and SD_SCRIPTS_PYTHON)'}; "
          f"load average {os.getloadavg()[0]:.1f}; cpu count {os.cpu_count()}; "
          f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'case':10s} {'job':12s} {'job s':>8s} {'proc s':>8s} {'RSS MiB':>8s} {'retained':>9s}"
          + (f" {'kohya s':>8s} {'RSS MiB':>8s} {'retained':>9s} {'speedup':>8s}" if kohya else "")
          + f" {'load':>5s}")
    for case in cases:
        a, b = folder / f"{case}_a.safetensors", folder / f"{case}_b.safetensors"
        _child(f"inputs_{case}", a, b, folder, rank, env)
        for job in jobs:
            out = folder / f"{case}_{job}.safetensors"
            answer, wall, rss = _child(job, a, b, out, rank, env)
            kept = _child(f"retained_{job}", a, b, out, rank, env)[0]["retained"]
            row = f"{case:10s} {job:12s} {answer['seconds']:8.2f} {wall:8.2f} {rss:8.0f} {kept:9.5f}"
            kohya_out = folder / f"{case}_{job}_kohya.safetensors"
            command = _kohya_command(job, a, b, kohya_out, rank) if kohya else None
            if command and case == "full_sd1":
                k_seconds, k_rss, _ = _measure([os.environ["SD_SCRIPTS_PYTHON"], *command],
                                               {**os.environ, "PYTHONPATH": os.environ["SD_SCRIPTS_DIR"]})
                k_kept = _child(f"retained_{job}", a, b, kohya_out, rank, env)[0]["retained"]
                row += f" {k_seconds:8.2f} {k_rss:8.0f} {k_kept:9.5f} {k_seconds / wall:7.1f}x"
            print(row + f" {os.getloadavg()[0]:5.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny_sdxl,full_sd1")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    parser.add_argument("--rank", type=int, default=16, help="SVD merge rank; resize goes to rank / 2")
    parser.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--a", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--b", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(args.job, args.a, args.b, args.out, args.rank)))
        return
    jobs = args.jobs.split(",")
    if set(jobs) - set(JOBS):
        parser.error(f"--jobs: unknown {sorted(set(jobs) - set(JOBS))}; use some of {','.join(JOBS)}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        drive(args.cases.split(","), jobs, args.rank, args.keep)
        return
    with tempfile.TemporaryDirectory() as folder:
        drive(args.cases.split(","), jobs, args.rank, Path(folder))


if __name__ == "__main__":
    main()
