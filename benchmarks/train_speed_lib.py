"""Helpers of train_speed.py: step-time figures, child processes measured with wait4, the dataset, and the kohya
sd-scripts command line with its tqdm progress parsed into per-step timestamps."""
from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "
STARTED_MARK = "BENCH_STARTED"
TQDM_STEPS = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
CAPTIONS = ["a photo of sks, red shirt, smiling", "sks standing outdoors, blue sky", "close-up of sks, studio light",
            "sks sitting on a bench, green park", "portrait of sks, black hair", "sks walking, city street, night",
            "sks holding a cup, kitchen", "full body shot of sks, white background"]


@dataclass
class RunFigures:
    """What one training run measured.

    Attributes:
        name (str): the case.
        trainer (str): "ours" or "sd-scripts".
        steps (int): steps trained.
        warmup (int): leading steps left out of the step-time figures.
        step_s (float): median seconds per step after warm-up.
        step_s_mean (float): mean seconds per step after warm-up.
        cpu_step_s (float): median CPU seconds (user + system, all threads) per step after warm-up: less
            sensitive than wall time to other work on the machine.
        setup_s (float): seconds from process start to the first step (imports, loading, latent caching).
        total_s (float): wall seconds of the whole process.
        peak_rss_gb (float): peak resident memory of the process (wait4 ru_maxrss), GiB.
        first_loss (float, optional): loss of the first step (ours only).
        last_loss (float, optional): loss of the last step (ours only).
        ok (bool): the process exited 0 and reported its steps.
        note (str): why not, or other remarks.
    """

    name: str
    trainer: str
    steps: int = 0
    warmup: int = 0
    step_s: float = float("nan")
    step_s_mean: float = float("nan")
    cpu_step_s: float = float("nan")
    setup_s: float = float("nan")
    total_s: float = float("nan")
    peak_rss_gb: float = float("nan")
    first_loss: float | None = None
    last_loss: float | None = None
    ok: bool = False
    note: str = ""
    step_times: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def merge_process_figures(parts: list[RunFigures]) -> RunFigures:
    """One row for the processes of a data-parallel run: the slowest process's step times (they wait for each
    other every step), the largest per-process peak RSS, CPU time summed over the processes.

    Args:
        parts (list[RunFigures]): each process's own figures (`peak_rss_gb` its VmHWM).

    Returns:
        RunFigures: the run.
    """
    slowest = max(parts, key=lambda f: f.step_s)
    merged = RunFigures(**asdict(slowest))
    merged.cpu_step_s = sum(f.cpu_step_s for f in parts)
    merged.peak_rss_gb = max(f.peak_rss_gb for f in parts)
    merged.ok = all(f.ok for f in parts)
    merged.note = (f"{len(parts)} processes; peak RSS each " + ", ".join(f"{f.peak_rss_gb:.2f}" for f in parts)
                   + " GiB; CPU s/st summed")
    return merged


def accelerate_command(processes: int) -> list[str]:
    """`accelerate launch` of `processes` processes on this machine (its multi-process launcher; with
    `--device cpu` or no CUDA they join over gloo), to be followed by a script and its arguments.

    Args:
        processes (int): how many.

    Returns:
        list[str]: the command's start.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def step_durations(marks: list[tuple[int, float]]) -> list[float]:
    """Per-step seconds from (step count, time) marks; a gap of several steps is spread evenly over them.

    Args:
        marks (list[tuple[int, float]]): increasing step counts with the time each was first seen; (0, t) is the
            start of the first step.

    Returns:
        list[float]: one duration per step after the first mark.
    """
    out: list[float] = []
    for (n0, t0), (n1, t1) in itertools.pairwise(marks):
        if n1 > n0:
            out += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
    return out


def summarize(figures: RunFigures, marks: list[tuple[int, float, float]], warmup: int) -> RunFigures:
    """Fill the step-time figures from (step count, wall time, CPU time) marks, leaving out `warmup` leading steps.

    Args:
        figures (RunFigures): filled in place.
        marks (list[tuple[int, float, float]]): see `step_durations`; (0, ...) marks the start of the first step.
        warmup (int): leading steps left out.

    Returns:
        RunFigures: `figures`.
    """
    durations = step_durations([(n, wall) for n, wall, _ in marks])
    cpu = step_durations([(n, used) for n, _, used in marks])
    figures.step_times = [round(d, 4) for d in durations]
    figures.warmup = min(warmup, max(0, len(durations) - 1))
    if durations:
        figures.step_s = statistics.median(durations[figures.warmup:])
        figures.step_s_mean = statistics.fmean(durations[figures.warmup:])
        figures.cpu_step_s = statistics.median(cpu[figures.warmup:])
    return figures


def peak_rss_self_gb() -> float:
    """VmHWM of this process in GiB (Linux), NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


@dataclass
class ChildRun:
    """A finished child process: exit code, peak RSS, wall time, its output, and when each output piece arrived."""

    returncode: int
    peak_rss_gb: float
    wall_s: float
    pieces: list[tuple[float, float, str]]  # (seconds since start, child's CPU seconds, text between \r/\n)

    @property
    def text(self) -> str:
        return "\n".join(p for _, _, p in self.pieces)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads) from /proc, NaN when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], cwd: str | Path | None, env: dict, log_path: Path, echo: bool = False) -> ChildRun:
    """Run `cmd`, timestamp every \\r/\\n-separated piece of its merged stdout+stderr, reap it with wait4.

    Args:
        cmd (list[str]): the command.
        cwd (str | Path, optional): working folder.
        env (dict): its environment.
        log_path (Path): where its raw output is written.
        echo (bool, optional): also copy its output to our stderr, defaults to False.

    Returns:
        ChildRun: exit code, ru_maxrss of the child in GiB, wall seconds, timestamped output pieces.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pieces: list[tuple[float, float, str]] = []
    pending = ""
    with log_path.open("wb") as log:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            now, used = time.perf_counter() - start, cpu_seconds(proc.pid)
            log.write(chunk)
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            parts = re.split(r"[\r\n]", pending + chunk.decode("utf-8", "replace"))
            pending = parts.pop()
            pieces += [(now, used, p) for p in parts if p]
    if pending:
        pieces.append((time.perf_counter() - start, float("nan"), pending))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    return ChildRun(proc.returncode, usage.ru_maxrss / 2**20, time.perf_counter() - start, pieces)


def write_dataset(root: Path, resolution: int, images: int = 8, repeats: int = 10, seed: int = 0) -> Path:
    """A kohya-layout dataset: `<root>/<repeats>_sks/NNN.png` + `.txt` captions, images at `resolution` px.

    Smooth random colour fields (not white noise), so the VAE sees image-like input.

    Returns:
        Path: the train_data_dir (`root`).
    """
    import numpy as np
    from PIL import Image

    folder = root / f"{repeats}_sks"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == images:
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    return root


def kohya_command(python: str, *, checkpoint: Path, data_dir: Path, output_dir: Path, tokenizer_cache: Path,
                  resolution: int, batch: int, rank: int, alpha: float, steps: int, seed: int = 0) -> list[str]:
    """sd-scripts' `train_network.py` with the settings our cases use (CPU, fp32, cached latents, SDPA)."""
    return [
        python, "train_network.py",
        "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(data_dir),
        "--resolution", f"{resolution},{resolution}", "--train_batch_size", str(batch),
        "--output_dir", str(output_dir), "--output_name", "bench", "--save_model_as", "safetensors",
        "--save_precision", "fp16", "--save_every_n_steps", "1000000",
        "--network_module", "networks.lora", "--network_dim", str(rank), "--network_alpha", str(alpha),
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
        "--max_train_steps", str(steps), "--mixed_precision", "no", "--cache_latents", "--sdpa",
        "--seed", str(seed), "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
        "--tokenizer_cache_dir", str(tokenizer_cache),
    ]


def kohya_marks(run: ChildRun) -> list[tuple[int, float, float]]:
    """(step count, wall and CPU time when first seen) from sd-scripts' tqdm `steps:` bar, starting with 0/N."""
    marks: list[tuple[int, float, float]] = []
    for when, used, text in run.pieces:
        match = TQDM_STEPS.search(text)
        if match:
            count = int(match.group(1))
            if not marks or count > marks[-1][0]:
                marks.append((count, when, used))
    return marks


def write_kohya_tokenizer(cache_dir: Path) -> Path:
    """sd-scripts looks for `<tokenizer_cache_dir>/openai_clip-vit-large-patch14`; write our offline CLIP-L
    tokenizer there (the same vocabulary and merges) so it does not go to the Hugging Face hub."""
    from lora_trainer.models.tokenizer import write_clip_tokenizer

    folder = cache_dir / "openai_clip-vit-large-patch14"
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer(folder)
    return cache_dir
