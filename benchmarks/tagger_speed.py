"""Tagging speed: our pipelined, batched tagger vs a plain one-image-at-a-time loop (what the WebUI WD14 tagger
extension does: load, preprocess, run, write, one image after the other) on the same ONNX model and images.

    python benchmarks/tagger_speed.py [--images 64] [--batch-size 8] [--workers N] [--width 32]

The model is a dynamic-batch convnet of realistic cost built with random weights (no download); the images are
synthetic JPEG/PNG files of typical dataset sizes. Prints images/s of both, the ratio, and a cost breakdown
(decode, preprocess, model at batch 1 and batch N) to show what bounds the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.data.images import load_image  # noqa: E402
from lora_trainer.tagging.tag_format import TagOptions  # noqa: E402
from lora_trainer.tagging.tagger import TaggerModel, prepare_image, tag_folder  # noqa: E402
from lora_trainer.tagging.tagger_input import load_for_tagging  # noqa: E402
from lora_trainer.testing.tiny_tagger import build_convnet_tagger  # noqa: E402

# (width, height, format, mode): image mixes of what LoRA datasets hold.
MIXES = {
    "dataset": [(1024, 1536, "JPEG", "RGB"), (1536, 1024, "JPEG", "RGB"), (1024, 1024, "PNG", "RGB"),
                (768, 1152, "PNG", "RGBA")],
    "photos": [(2000, 3000, "JPEG", "RGB"), (3000, 2000, "JPEG", "RGB")],
    "small": [(512, 768, "PNG", "RGB"), (768, 512, "JPEG", "RGB")],
}


def make_images(folder: Path, n: int, mix: str = "dataset") -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h, fmt, mode = MIXES[mix][i % len(MIXES[mix])]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 100 * np.sin(x / (40 + 20 * k) + y / 70 + phase[k]) for k in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        arr = np.clip(img, 0, 255).astype(np.uint8)
        if mode == "RGBA":
            alpha = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 2.2) ** 2, 255, 0).astype(np.uint8)
            arr = np.dstack([arr, alpha])
        path = folder / f"img{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(arr, mode).save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], model_file: Path, names: list[str], general: np.ndarray,
               threshold: float = 0.35) -> float:
    """The one-by-one reference loop, with its own session; returns seconds (session creation excluded)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    size = inp.shape[1]
    session.run(None, {inp.name: np.zeros((1, size, size, 3), np.float32)})  # warm-up, as ours gets
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
        side = max(image.size)
        padded = Image.new("RGB", (side, side), (255, 255, 255))
        padded.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        padded = padded.resize((size, size), Image.Resampling.BICUBIC)
        batch = np.asarray(padded, dtype=np.float32)[:, :, ::-1][None]
        probs = session.run(None, {inp.name: np.ascontiguousarray(batch)})[0][0]
        tags = [names[i].replace("_", " ") for i in general[np.argsort(-probs[general])] if probs[i] > threshold]
        path.with_suffix(".plain.txt").write_text(", ".join(tags), encoding="utf-8")
    return time.perf_counter() - start


def _ms_per(items, fn) -> tuple[list, float]:
    """Results and CPU milliseconds per item (process CPU time: all threads, unaffected by other processes)."""
    start = time.process_time()
    out = [fn(x) for x in items]
    return out, (time.process_time() - start) / len(items) * 1e3


def breakdown(paths: list[Path], model: TaggerModel, batch: int) -> dict[str, float]:
    """CPU milliseconds per image of each stage, measured alone (one thread for decoding and preprocessing)."""
    size, sample = model.input_size, paths[: min(len(paths), 16)]
    images, decode = _ms_per(sample, load_image)
    arrays, preprocess = _ms_per(images, lambda im: prepare_image(im, size))
    _, drafted = _ms_per(sample, lambda p: prepare_image(load_for_tagging(p, size, draft=True), size))
    arrays = np.stack(arrays)
    _, b1 = _ms_per(range(len(arrays)), lambda i: model.predict(arrays[i:i + 1]))
    _, bn = _ms_per(range(max(1, len(arrays) // batch)), lambda _: model.predict(arrays[:batch]))
    return {"decode": decode, "preprocess": preprocess, "decode+preprocess with --fast-jpeg": drafted,
            "model batch 1": b1, f"model batch {batch}": bn / batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--mix", choices=sorted(MIXES), default="dataset", help="image sizes/formats")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: tagger's default)")
    parser.add_argument("--width", type=int, default=32, help="convnet width: 32 = tens of ms per image on CPU")
    parser.add_argument("--tags", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1, help="alternate both runs this many times (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = build_convnet_tagger(tmp / "convnet-tagger", width=args.width, num_tags=args.tags)
        paths = make_images(tmp, args.images, args.mix)
        model = TaggerModel(folder)
        model.predict(np.zeros((args.batch_size, model.input_size, model.input_size, 3), np.float32))  # warm-up
        shapes = sorted({f"{w}x{h} {f}" for w, h, f, _ in MIXES[args.mix]})
        print(f"{len(paths)} images {shapes}, model input {model.input_size}px, {len(model.labels.names)} tags, "
              f"{os.cpu_count()} CPUs, {model.provider}, load average {os.getloadavg()[0]:.1f}")
        options = TagOptions(existing="overwrite", general_threshold=0.35, include_characters=False)
        rates: dict[str, list[float]] = {"plain": [], "ours": [], "ours_fast_jpeg": []}
        cpu: dict[str, list[float]] = {key: [] for key in rates}  # process CPU ms per image, all threads
        same = {}
        for _ in range(args.repeats):
            cpu_start = time.process_time()
            rates["plain"].append(len(paths) / plain_loop(paths, folder / "model.onnx", list(model.labels.names),
                                                          model.labels.general))
            cpu["plain"].append((time.process_time() - cpu_start) / len(paths) * 1e3)
            for key, draft in (("ours", False), ("ours_fast_jpeg", True)):
                cpu_start = time.process_time()
                summary = tag_folder(paths, model, options, batch_size=args.batch_size, workers=args.workers,
                                     jpeg_draft=draft)
                cpu[key].append((time.process_time() - cpu_start) / len(paths) * 1e3)
                assert summary.tagged == len(paths), summary.failed
                rates[key].append(len(paths) / summary.seconds)
                same[key] = sum(set(p.with_suffix(".txt").read_text().split(", "))
                                == set(p.with_suffix(".plain.txt").read_text().split(", ")) for p in paths)
        parts = breakdown(paths, model, args.batch_size)
    plain = float(np.median(rates["plain"]))
    for key, label in (("plain", "plain one-by-one loop"), ("ours", f"our tagger (batch {args.batch_size})"),
                       ("ours_fast_jpeg", "our tagger, --fast-jpeg")):
        rate = float(np.median(rates[key]))
        extra = "" if key == "plain" else f", {rate / plain:.2f}x, same tags on {same[key]}/{len(paths)} images"
        print(f"{label:32s} {rate:6.2f} images/s (runs: {', '.join(f'{r:.2f}' for r in rates[key])}), "
              f"CPU {np.median(cpu[key]):.0f} ms/image{extra}")
    print("CPU per image, each stage alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = parts["decode"] + parts["preprocess"] + parts[f"model batch {args.batch_size}"]
    print(f"CPU work per image {work:.0f} ms on {cores} cores: at best {1e3 * cores / work:.1f} images/s for any "
          f"pipeline here; the model is {parts[f'model batch {args.batch_size}'] / work:.0%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
