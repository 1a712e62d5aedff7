"""Time and peak RSS of the checkpoint tools (bake, extract, checkpoint merge, prune), optionally against kohya.

Models:
    tiny_sdxl   the tiny SDXL checkpoint of the tests (lora_trainer.testing.build_tiny_model)
    full_sd1    a full-size SD1.5-architecture checkpoint with random weights, fp16 (built once in the cache folder)

Per model: a random LoRA of rank --dim on kohya's plain targets (UNet attention + text encoder) is made from the
checkpoint's header, then each job runs in its own process through the library call the CLI uses:
    bake      A + LoRA (ratio 1)        -> B (the "tuned" model)
    extract   B - A at rank --dim       -> LoRA (full SVDs, as kohya; then `--fast` randomized SVDs)
    merge     A*(1-0.5) + B*0.5         -> M
    prune     M to fp16 (no EMA to drop here: it measures a pure streamed rewrite)
"peak RSS" is the child's ru_maxrss (wait4), "RSS/file" divides it by the size of one input checkpoint (target for
merge: <= 1.5). The Python + torch baseline of a child (~0.3 GiB) is included. Nothing here asserts a timing;
wall times depend on the other work on the machine.

With SD_SCRIPTS_DIR (a checkout of kohya-ss/sd-scripts) and SD_SCRIPTS_PYTHON (a Python where it runs), kohya's
`networks/extract_lora_from_models.py` extracts the same B - A at the same rank for the full-size model and the
ratio ours/theirs is printed (kohya cannot load the tiny checkpoints: it builds full-size modules). Unset: skipped.
Both extractions are also scored the same way by "kept": the share of the Frobenius norm of the baked LoRA's
delta (B - A up to fp16 rounding) that the extracted LoRA reproduces, read back from the written file.

    python benchmarks/ckpt_tools_speed.py                       # both models
    python benchmarks/ckpt_tools_speed.py --models tiny_sdxl --dim 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed_lib import run_child  # noqa: E402

RESULT = "RESULT "
MODELS = ("tiny_sdxl", "full_sd1")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lora_trainer" / "benchmarks"


# -- jobs, each in its own process -----------------------------------------------------------------------------
def make_model(name: str, cache: Path) -> dict:
    if name == "tiny_sdxl":
        from lora_trainer.testing.tiny_models import build_tiny_model

        return {"checkpoint": str(build_tiny_model("sdxl", cache / "tiny_sdxl").checkpoint)}
    from lora_trainer.testing.random_models import build_random_model

    return {"checkpoint": str(build_random_model("sd1", cache / "full_sd1", precision="fp16").checkpoint)}


def make_lora(checkpoint: str, out: str, dim: int) -> dict:
    """A random kohya LoRA on the checkpoint's plain targets, shapes from the header only."""
    import torch

    from lora_trainer.networks import save_lora
    from lora_trainer.networks.metadata import base_model_version
    from lora_trainer.tools.ckpt_keys import checkpoint_family, lora_targets
    from lora_trainer.tools.tensor_stream import TensorReader

    with TensorReader(checkpoint) as reader:
        arch = checkpoint_family(reader.infos)
        targets = [t for t in lora_targets(reader.infos, arch).values() if t.kind == "attention"]
    generator = torch.Generator().manual_seed(0)
    state = {}
    for t in targets:
        rank = min(dim, t.shape[0], t.shape[1])
        state[f"{t.name}.lora_down.weight"] = (torch.randn(rank, *t.shape[1:], generator=generator) * 0.05).half()
        up = torch.randn(t.shape[0], rank, *([1, 1] if len(t.shape) == 4 else []), generator=generator) * 0.05
        state[f"{t.name}.lora_up.weight"] = up.half()
        state[f"{t.name}.alpha"] = torch.tensor(float(rank)).half()
    save_lora(out, state, {"ss_base_model_version": base_model_version(arch), "ss_v2": str(arch == "sd2"),
                           "ss_network_dim": str(dim), "ss_network_alpha": str(dim)})
    return {"modules": len(targets)}


def kept_energy(exact: str, out: str) -> float:
    """Share of the Frobenius norm of the LoRA `exact`'s delta that the LoRA file `out` reproduces."""
    from lora_trainer.tools import read_lora

    want, got = read_lora(exact), read_lora(out)
    total = error = 0.0
    for name in want.modules:
        delta = want.delta(name).double()
        mine = got.delta(name).double() if name in got.modules else delta * 0
        total += float(delta.square().sum())
        error += float((mine.reshape(delta.shape) - delta).square().sum())
    return max(0.0, 1 - error / total) ** 0.5


def run_job(spec: dict) -> dict:
    from lora_trainer.tools.bake import LoraToBake, bake_loras
    from lora_trainer.tools.ckpt_merge import merge_checkpoints
    from lora_trainer.tools.extract import extract_lora
    from lora_trainer.tools.prune import prune_checkpoint

    job = spec["job"]
    started = time.perf_counter()
    if job == "model":
        return make_model(spec["name"], Path(spec["cache"]))
    if job == "kept":
        return {"kept": kept_energy(spec["exact"], spec["out"])}
    if job == "lora":
        result = make_lora(spec["checkpoint"], spec["out"], spec["dim"])
    elif job == "bake":
        result = {"modules": bake_loras(spec["a"], [LoraToBake(Path(spec["lora"]))], spec["out"],
                                        hash_inputs=False).modules}
    elif job in ("extract", "extract-fast"):
        extracted = extract_lora(spec["b"], spec["a"], spec["out"], dim=spec["dim"], fast=job == "extract-fast")
        energy = extracted.retained_energy.values()
        result = {"modules": extracted.modules, "retained_min": min(energy), "retained_mean": sum(energy) / len(energy)}
    elif job == "merge":
        result = {"merged": merge_checkpoints(spec["a"], spec["b"], spec["out"], alpha=0.5, hash_inputs=False).merged}
    elif job == "prune":
        result = {"kept": prune_checkpoint(spec["a"], spec["out"], precision="fp16").kept}
    else:
        raise SystemExit(f"unknown job {job!r}")
    result["seconds"] = time.perf_counter() - started
    return result


# -- the driver --------------------------------------------------------------------------------------------------
def child(spec: dict, work: Path, env: dict) -> tuple[dict, float, float]:
    """Run one job in a child; (its result, wall seconds, peak RSS GiB)."""
    log = work / f"{spec['job']}_{spec.get('name', Path(spec.get('out', 'x')).stem)}.log"
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(spec)], None, env, log)
    line = next((p for _, _, p in reversed(run.pieces) if p.startswith(RESULT)), None)
    if run.returncode != 0 or line is None:
        raise SystemExit(f"{spec['job']} failed (see {log}):\n{run.text[-3000:]}")
    return json.loads(line[len(RESULT):]), run.wall_s, run.peak_rss_gb


def kohya_extract(a: Path, b: Path, out: Path, dim: int, work: Path) -> tuple[float, float] | None:
    sd_dir, python = os.environ.get("SD_SCRIPTS_DIR"), os.environ.get("SD_SCRIPTS_PYTHON")
    if not (sd_dir and python):
        return None
    cmd = [python, "networks/extract_lora_from_models.py", "--model_org", str(a), "--model_tuned", str(b),
           "--save_to", str(out), "--dim", str(dim), "--save_precision", "fp16", "--device", "cpu"]
    # networks/ scripts import sd-scripts' `library` package, which is only importable from its root folder
    run = run_child(cmd, sd_dir, dict(os.environ, PYTHONPATH=sd_dir), work / "kohya_extract.log")
    if run.returncode != 0:
        print(f"kohya extract failed (see {work / 'kohya_extract.log'}):\n{run.text[-2000:]}")
        return None
    return run.wall_s, run.peak_rss_gb


def bench_model(name: str, args, work: Path, env: dict) -> list[tuple]:
    model, wall, _ = child({"job": "model", "name": name, "cache": str(args.cache)}, work, env)
    a = Path(model["checkpoint"])
    size_gb = a.stat().st_size / 2**30
    print(f"[{name}: {a} ({size_gb:.2f} GiB), ready in {wall:.0f} s]", flush=True)
    folder = work / name
    folder.mkdir()
    lora, b, m = folder / "lora.safetensors", folder / "b.safetensors", folder / "m.safetensors"
    child({"job": "lora", "checkpoint": str(a), "out": str(lora), "dim": args.dim}, work, env)
    rows = []
    jobs = [("bake", {"a": str(a), "lora": str(lora), "out": str(b)}),
            ("extract", {"a": str(a), "b": str(b), "dim": args.dim, "out": str(folder / "extracted.safetensors")}),
            ("extract-fast", {"a": str(a), "b": str(b), "dim": args.dim, "out": str(folder / "fast.safetensors")}),
            ("merge", {"a": str(a), "b": str(b), "out": str(m)}),
            ("prune", {"a": str(m), "out": str(folder / "pruned.safetensors")})]
    for job, spec in jobs:
        result, wall, rss = child({"job": job, **spec}, work, env)
        rows.append((name, job, wall, result["seconds"], rss, rss / size_gb))
        energy = f"  retained energy min {result['retained_min']:.4f} mean {result['retained_mean']:.4f}" \
            if "retained_min" in result else ""
        if job.startswith("extract"):
            kept = child({"job": "kept", "exact": str(lora), "out": spec["out"]}, work, env)[0]["kept"]
            energy += f"  kept {kept:.5f}"
        print(f"  {job:12s} wall {wall:7.1f} s  (in the job {result['seconds']:7.1f} s)  peak RSS {rss:5.2f} GiB  "
              f"RSS/file {rss / size_gb:5.2f}{energy}", flush=True)
    if name == "full_sd1":
        theirs = kohya_extract(a, b, folder / "kohya_extracted.safetensors", args.dim, work)
        if theirs is not None:
            ours = next(r for r in rows if r[1] == "extract")
            out = str(folder / "kohya_extracted.safetensors")
            kept = child({"job": "kept", "exact": str(lora), "out": out}, work, env)[0]["kept"]
            print(f"  kohya extract wall {theirs[0]:7.1f} s peak RSS {theirs[1]:5.2f} GiB  kept {kept:.5f} -> "
                  f"ours/theirs: time {ours[2] / theirs[0]:.2f}x, RSS {ours[4] / theirs[1]:.2f}x; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    return rows


def drive(args) -> int:
    kohya = bool(os.environ.get("SD_SCRIPTS_DIR") and os.environ.get("SD_SCRIPTS_PYTHON"))
    print(f"checkpoint tools benchmark: models {', '.join(args.models)}; rank {args.dim}; kohya comparison "
          f"{'on' if kohya else 'off (set SD_SCRIPTS_DIR and SD_SCRIPTS_PYTHON)'}; cpu count {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckpt_tools_speed_") as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp), env)
    print("\nmodel      job           wall s   job s  peak GiB  RSS/file")
    for name, job, wall, seconds, rss, ratio in rows:
        print(f"{name:10s} {job:12s} {wall:7.1f} {seconds:7.1f} {rss:9.2f} {ratio:9.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                        help=f"comma-separated, from {MODELS}")
    parser.add_argument("--dim", type=int, default=16, help="LoRA / extraction rank (default: 16)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="where built models are kept")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        print(RESULT + json.dumps(run_job(json.loads(args.job))), flush=True)
        return 0
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; use {MODELS}")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
