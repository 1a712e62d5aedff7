"""Training speed (seconds/step) and peak RSS of our trainer on CPU, optionally against kohya sd-scripts.

Cases (LoRA rank 64 / alpha 64, AdamW lr 1e-4 constant, cache_latents, fp32 (mixed_precision "no"), SDPA, UNet and
text-encoder LoRA as kohya's default, 8 images x 10 repeats, no data-loader workers, CPU):
    tiny_64_b1, tiny_64_b4, tiny_128_b1, tiny_128_b4   the tiny SD1 model (lora_trainer.testing.build_tiny_model)
    full_64_b1                                          a full-size SD1.5-architecture checkpoint with random weights
                                                        (built once, fp16 single file, in the cache folder)
    tiny_64_b2_x2                                       two processes (CPU, gloo) at batch 2 each, beside tiny_64_b4:
                                                        the same total batch, launched by `accelerate launch`
    full_64_b2, full_64_b1_x2                           the same pair on the full-size model (only with --cases)

A multi-process case reports the slowest process's step time and the largest per-process peak RSS (each process's
own VmHWM), and prints both as a ratio to its one-process partner (which runs too when not asked for).

Each case trains in its own process through the real path (config_from_dict -> load_checkpoint_adapter ->
Trainer); the step time is the median of the per-step times (from the timestamps of `Step` events) after the
warm-up steps, "CPU s/st" the median CPU seconds (all threads) per step, the peak RSS is the child's ru_maxrss
(wait4). Wall times depend heavily on other work on the machine (the load average is printed with each row):
compare trainers from one invocation on an otherwise idle machine. Nothing here asserts a timing.

    python benchmarks/train_speed.py                        # every case
    python benchmarks/train_speed.py --cases tiny_64_b1,full_64_b1 --steps 20
    python benchmarks/train_speed.py --cases full_64_b1 --full-precision fp32   # checkpoint file stored in fp32
    python benchmarks/train_speed.py --cases full_64_b1 --optimizer-arg fused=True   # what-if, our runs only
    python benchmarks/train_speed.py --cases tiny_64_b2_x2 --steps 20    # two processes vs one (tiny model)
    python benchmarks/train_speed.py --cases full_64_b1_x2 --trainers ours  # the same on the full-size model
    python benchmarks/train_speed.py --case tiny_64_b1 ...  # one case in this process (what the driver runs)

Comparison with kohya sd-scripts: set SD_SCRIPTS_DIR to a checkout of kohya-ss/sd-scripts and SD_SCRIPTS_PYTHON to
the Python of an environment where it runs (its requirements.txt installed on a CPU build of torch; xformers is not
needed). The full-size case is then also trained by its `train_network.py` with the same checkpoint file, dataset
folder, rank, alpha, batch, resolution, steps, optimizer, fp32, cache_latents, `--sdpa`, CPU; its per-step times
come from the timestamps of its tqdm `steps:` bar. The table then shows ours/theirs for step time and peak RSS
(targets: <= 0.8x both). sd-scripts cannot load the tiny checkpoints (it builds full-size modules), so only
full-size cases are compared. A CLIP-L tokenizer folder is written for it (`--tokenizer_cache_dir`), so it needs no
network access.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed_lib import (
    RESULT_PREFIX,
    STARTED_MARK,
    RunFigures,
    accelerate_command,
    merge_process_figures,
    kohya_command,
    kohya_marks,
    peak_rss_self_gb,
    run_child,
    summarize,
    write_dataset,
    write_kohya_tokenizer,
)

RANK = 64
ALPHA = 64
TARGET_RATIO = 0.8


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "tiny" or "full"
    resolution: int
    batch: int
    steps: int
    warmup: int
    processes: int = 1  # data-parallel processes; `batch` is per process (kohya), the total is batch x processes
    optional: bool = False  # run only when named in --cases


CASES = {c.name: c for c in [
    Case("tiny_64_b1", "tiny", 64, 1, 40, 5),
    Case("tiny_64_b4", "tiny", 64, 4, 30, 5),
    Case("tiny_128_b1", "tiny", 128, 1, 40, 5),
    Case("tiny_128_b4", "tiny", 128, 4, 30, 5),
    Case("full_64_b1", "full", 64, 1, 12, 3),
    Case("tiny_64_b2_x2", "tiny", 64, 2, 30, 5, processes=2),
    Case("full_64_b2", "full", 64, 2, 12, 3, optional=True),
    Case("full_64_b1_x2", "full", 64, 1, 12, 3, processes=2, optional=True),
]}


def one_process_partner(case: Case) -> Case | None:
    """The one-process case with the same model, resolution and total batch as a multi-process case."""
    return next((c for c in CASES.values() if c.processes == 1 and c.model == case.model
                 and c.resolution == case.resolution and c.batch == case.batch * case.processes), None)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lora_trainer" / "benchmarks"


# -- one case, in this process ------------------------------------------------------------------------------------
def our_config(case: Case, checkpoint: Path, data_dir: Path, out_dir: Path, config_dir: str | None,
               tokenizer_dir: str | None, steps: int, optimizer_args: list[str] | None = None):
    from lora_trainer.config import config_from_dict

    values = {
        "pretrained_model_name_or_path": str(checkpoint), "train_data_dir": str(data_dir),
        "resolution": f"{case.resolution},{case.resolution}", "train_batch_size": case.batch,
        "network_module": "networks.lora", "network_dim": RANK, "network_alpha": ALPHA,
        "optimizer_type": "AdamW", "learning_rate": 1e-4, "lr_scheduler": "constant",
        "max_train_steps": steps, "mixed_precision": "no", "cache_latents": True, "sdpa": True, "seed": 0,
        "output_dir": str(out_dir), "output_name": "bench", "save_precision": "fp16",
        "max_data_loader_n_workers": 0, "caption_extension": ".txt", "optimizer_args": list(optimizer_args or []),
    }
    if config_dir:
        values["diffusers_config_dir"] = config_dir
    if tokenizer_dir:
        values["tokenizer_dir"] = tokenizer_dir
    loaded = config_from_dict(values)
    if loaded.unknown_keys or loaded.warnings:
        print(f"config notes: unknown {loaded.unknown_keys}, warnings {loaded.warnings}", file=sys.stderr)
    return loaded.config


def run_case_here(args) -> int:
    """Train one case in this process and print its figures as one `BENCH_RESULT {json}` line."""
    import torch

    from lora_trainer.models.loading import load_checkpoint_adapter
    from lora_trainer.train import EventBus, Started, Step, Trainer
    from lora_trainer.train.distributed import join_process_group

    case = CASES[args.case]
    steps = args.steps or case.steps
    config = our_config(case, Path(args.checkpoint), Path(args.data_dir), Path(args.out_dir), args.config_dir,
                        args.tokenizer_dir, steps, args.optimizer_arg)
    adapter = load_checkpoint_adapter(config.model.pretrained_model_name_or_path,
                                      config_dir=config.model.diffusers_config_dir,
                                      tokenizer_dir=config.model.tokenizer_dir, device="cpu", dtype=torch.float32)
    marks: list[tuple[int, float, float]] = []
    losses: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, Started):
            marks.append((0, time.perf_counter(), time.process_time()))
            print(STARTED_MARK, flush=True)
        elif isinstance(event, Step):
            marks.append((event.step, time.perf_counter(), time.process_time()))
            losses.append(event.loss)

    bus = EventBus()
    bus.subscribe(on_event)
    group = join_process_group("cpu")  # one process alone, or one of those `accelerate launch` started
    try:
        result = Trainer(config, adapter, events=bus, group=group).run()
    finally:
        group.close()
    figures = summarize(RunFigures(case.name, "ours", steps=result.steps), marks,
                        args.warmup if args.warmup is not None else case.warmup)
    figures.first_loss, figures.last_loss = (losses[0], losses[-1]) if losses else (None, None)
    figures.peak_rss_gb = peak_rss_self_gb()
    figures.ok = result.steps == steps
    figures.note = f"torch threads {torch.get_num_threads()}"
    if group.world_size > 1:
        figures.note += f"; process {group.rank + 1}/{group.world_size}"
    print(RESULT_PREFIX + figures.to_json(), flush=True)
    return 0


# -- the driver --------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    checkpoint: Path
    config_dir: str | None
    tokenizer_dir: str | None


def prepare_model(kind: str, cache: Path, work: Path, precision: str) -> Prepared:
    """Build the model of a case kind in a child process (so its memory is not ours), return its paths."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            + ("from lora_trainer.testing import build_tiny_model as b; m = b('sd1', sys.argv[2]); "
               "print('PATHS ' + json.dumps([str(m.checkpoint), str(m.config_dir), str(m.tokenizer_dir)]))"
               if kind == "tiny" else
               "from lora_trainer.testing.random_models import build_random_model as b; "
               "m = b('sd1', sys.argv[2], precision=sys.argv[3]); "
               "print('PATHS ' + json.dumps([str(m.checkpoint), None, None]))"))
    folder = cache / ("tiny_sd1" if kind == "tiny" else "full_sd1")
    started = time.perf_counter()
    run = run_child([sys.executable, "-c", code, str(REPO), str(folder), precision], None, dict(os.environ),
                    work / f"prepare_{kind}.log")
    line = next((p for _, _, p in run.pieces if p.startswith("PATHS ")), None)
    if run.returncode != 0 or line is None:
        raise SystemExit(f"building the {kind} model failed; see {work / f'prepare_{kind}.log'}:\n{run.text[-3000:]}")
    checkpoint, config_dir, tokenizer_dir = json.loads(line[len("PATHS "):])
    print(f"[{kind} model ready in {time.perf_counter() - started:.0f} s: {checkpoint}]", flush=True)
    return Prepared(Path(checkpoint), config_dir, tokenizer_dir)


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def run_ours(case: Case, model: Prepared, data_dir: Path, work: Path, args) -> RunFigures:
    out_dir = Path(tempfile.mkdtemp(prefix=f"ours_{case.name}_", dir=work))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case.name, "--checkpoint", str(model.checkpoint),
           "--data-dir", str(data_dir), "--out-dir", str(out_dir)]
    cmd += ["--config-dir", model.config_dir] if model.config_dir else []
    cmd += ["--tokenizer-dir", model.tokenizer_dir] if model.tokenizer_dir else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    for item in args.optimizer_arg:
        cmd += ["--optimizer-arg", item]
    if case.processes > 1:
        cmd = accelerate_command(case.processes) + cmd[1:]
    run = run_child(cmd, REPO, child_env(args), work / f"ours_{case.name}.log", args.verbose)
    lines = [p for _, _, p in run.pieces if p.startswith(RESULT_PREFIX)]
    figures = RunFigures(case.name, "ours")
    if run.returncode == 0 and len(lines) == case.processes:
        parts = [RunFigures(**json.loads(line[len(RESULT_PREFIX):])) for line in lines]
        figures = parts[0] if len(parts) == 1 else merge_process_figures(parts)
    else:
        figures.note = f"exit {run.returncode}; see {work / f'ours_{case.name}.log'}"
        print(run.text[-3000:], file=sys.stderr)
    figures.setup_s = next((t for t, _, p in run.pieces if p == STARTED_MARK), float("nan"))
    figures.total_s = run.wall_s
    if case.processes == 1:  # several processes report their own peaks (wait4 sees the launcher)
        figures.peak_rss_gb = run.peak_rss_gb
    return figures


def run_kohya(case: Case, model: Prepared, data_dir: Path, work: Path, cache: Path, args) -> RunFigures:
    sd_dir, python = os.environ["SD_SCRIPTS_DIR"], os.environ["SD_SCRIPTS_PYTHON"]
    steps = args.steps or case.steps
    out_dir = Path(tempfile.mkdtemp(prefix=f"kohya_{case.name}_", dir=work))
    cmd = kohya_command(python, checkpoint=model.checkpoint, data_dir=data_dir, output_dir=out_dir,
                        tokenizer_cache=write_kohya_tokenizer(cache / "sd_scripts_tokenizers"),
                        resolution=case.resolution, batch=case.batch, rank=RANK, alpha=ALPHA, steps=steps)
    env = dict(child_env(args), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run = run_child(cmd, sd_dir, env, work / f"kohya_{case.name}.log", args.verbose)
    marks = kohya_marks(run)
    figures = summarize(RunFigures(case.name, "sd-scripts", steps=marks[-1][0] if marks else 0),
                        marks, args.warmup if args.warmup is not None else case.warmup)
    figures.setup_s = marks[0][1] if marks else float("nan")
    figures.peak_rss_gb, figures.total_s = run.peak_rss_gb, run.wall_s
    figures.ok = run.returncode == 0 and figures.steps == steps
    if not figures.ok:
        figures.note = f"exit {run.returncode}; see {work / f'kohya_{case.name}.log'}"
        print(run.text[-3000:], file=sys.stderr)
    return figures


def _fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return f"{'-':>{width}}" if missing else format(value, spec)


def print_table(rows: list[RunFigures]) -> None:
    head = (f"{'case':<14} {'trainer':<10} {'steps':>5} {'s/step':>8} {'mean':>8} {'CPU s/st':>8} {'setup s':>8} "
            f"{'peak RSS GiB':>12} {'loss first->last':>17}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        loss = f"{_fmt(r.first_loss, '.4f')}->{_fmt(r.last_loss, '.4f')}" if r.first_loss is not None else "-"
        print(f"{r.name:<14} {r.trainer:<10} {r.steps:>5} {_fmt(r.step_s, '8.3f')} {_fmt(r.step_s_mean, '8.3f')} "
              f"{_fmt(r.cpu_step_s, '8.3f')} {_fmt(r.setup_s, '8.1f')} {_fmt(r.peak_rss_gb, '12.2f')} {loss:>17}  "
              f"{r.note}", flush=True)


def print_ratios(rows: list[RunFigures]) -> None:
    theirs = {r.name: r for r in rows if r.trainer == "sd-scripts" and r.ok}
    for ours in (r for r in rows if r.trainer == "ours" and r.ok and r.name in theirs):
        other = theirs[ours.name]
        pairs = (("step time", ours.step_s, other.step_s), ("CPU time/step", ours.cpu_step_s, other.cpu_step_s),
                 ("peak RSS", ours.peak_rss_gb, other.peak_rss_gb))
        for label, a, b in pairs:
            ratio = a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")
            verdict = "-" if math.isnan(ratio) else ("meets" if ratio <= TARGET_RATIO else "misses")
            print(f"{ours.name}: ours/sd-scripts {label} = {_fmt(ratio, '.2f')}x "
                  f"({verdict} the <= {TARGET_RATIO}x target)")


def print_process_ratios(rows: list[RunFigures]) -> None:
    """Each multi-process case against its one-process partner: steps/s and peak RSS per process."""
    ours = {r.name: r for r in rows if r.trainer == "ours" and r.ok}
    for name, multi in ours.items():
        case, partner = CASES[name], one_process_partner(CASES[name])
        if case.processes == 1 or partner is None or partner.name not in ours:
            continue
        one = ours[partner.name]
        print(f"{name} vs {partner.name} (total batch {partner.batch}): steps/s {1 / multi.step_s:.2f} vs "
              f"{1 / one.step_s:.2f} = {one.step_s / multi.step_s:.2f}x; peak RSS per process "
              f"{multi.peak_rss_gb:.2f} vs {one.peak_rss_gb:.2f} GiB = {multi.peak_rss_gb / one.peak_rss_gb:.2f}x")


def drive(args) -> int:
    names = [n.strip() for n in args.cases.split(",")] if args.cases else [n for n, c in CASES.items()
                                                                            if not c.optional]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; use some of {list(CASES)}")
    partners = [one_process_partner(CASES[n]) for n in names if CASES[n].processes > 1]
    names = [p.name for p in partners if p and p.name not in names] + names
    cache = Path(args.cache_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="train_speed_"))
    trainers = {t.strip() for t in args.trainers.split(",")}
    kohya = bool(os.environ.get("SD_SCRIPTS_DIR") and os.environ.get("SD_SCRIPTS_PYTHON"))
    print(f"cases {names}; cache {cache}; logs in {work}; sd-scripts comparison "
          f"{'on' if kohya else 'off (set SD_SCRIPTS_DIR and SD_SCRIPTS_PYTHON)'}; cpu count {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}; full-size checkpoint stored as {args.full_precision}; "
          f"our extra optimizer_args {args.optimizer_arg or 'none'}; threads {args.threads or 'default'}", flush=True)
    models: dict[str, Prepared] = {}
    rows: list[RunFigures] = []
    for name in names:
        case = CASES[name]
        if case.model not in models:
            models[case.model] = prepare_model(case.model, cache, work, args.full_precision)
        data_dir = write_dataset(cache / f"dataset_{case.resolution}", case.resolution)
        if "ours" in trainers:
            rows.append(run_ours(case, models[case.model], data_dir, work, args))
            rows[-1].note += f"; load avg {os.getloadavg()[0]:.1f}"
            print_table(rows[-1:])
        if kohya and "sd-scripts" in trainers and case.model == "full":
            rows.append(run_kohya(case, models[case.model], data_dir, work, cache, args))
            rows[-1].note += f"; load avg {os.getloadavg()[0]:.1f}"
            print_table(rows[-1:])
    print()
    print_table(rows)
    print_ratios(rows)
    print_process_ratios(rows)
    return 0 if all(r.ok for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--steps", type=int, help="steps per case (default: per case)")
    parser.add_argument("--warmup", type=int, help="steps left out of the figures (default: per case)")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="models and datasets are kept here")
    parser.add_argument("--trainers", default="ours,sd-scripts", help="ours, sd-scripts or both (default)")
    parser.add_argument("--full-precision", choices=("fp16", "fp32"), default="fp16",
                        help="storage precision of the full-size checkpoint file (training is fp32 either way)")
    parser.add_argument("--optimizer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra optimizer_args for OUR runs only (a what-if, e.g. fused=True); repeatable")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of both trainers (default: torch's choice); "
                        "1 gives steadier figures on a busy machine")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    for hidden in ("--checkpoint", "--data-dir", "--out-dir", "--config-dir", "--tokenizer-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_case_here(args) if args.case else drive(args)


if __name__ == "__main__":
    sys.exit(main())
