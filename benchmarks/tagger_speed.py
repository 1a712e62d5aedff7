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
from lora_trainer.testing.tiny_tagger import build_convnet_tagger  # noqa: E402

# (width, height, format, mode): a mix of what a LoRA dataset holds.
SHAPES = [(1024, 1536, "JPEG", "RGB"), (1536, 1024, "JPEG", "RGB"), (1024, 1024, "PNG", "RGB"),
          (768, 1152, "PNG", "RGBA")]


def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h, fmt, mode = SHAPES[i % len(SHAPES)]
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


def breakdown(paths: list[Path], model: TaggerModel, batch: int) -> dict[str, float]:
    """Milliseconds per image of each stage, measured alone (single thread for decode and preprocess)."""
    sample = paths[: min(len(paths), 16)]
    t0 = time.perf_counter()
    images = [load_image(p) for p in sample]
    t1 = time.perf_counter()
    arrays = np.stack([prepare_image(im, model.input_size) for im in images])
    t2 = time.perf_counter()
    for i in range(len(arrays)):
        model.predict(arrays[i:i + 1])
    t3 = time.perf_counter()
    reps = max(1, len(arrays) // batch)
    for _ in range(reps):
        model.predict(arrays[:batch])
    t4 = time.perf_counter()
    n = len(sample)
    return {"decode": (t1 - t0) / n * 1e3, "preprocess": (t2 - t1) / n * 1e3, "model_b1": (t3 - t2) / n * 1e3,
            f"model_b{batch}": (t4 - t3) / (reps * batch) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: tagger's default)")
    parser.add_argument("--width", type=int, default=32, help="convnet width: 32 = tens of ms per image on CPU")
    parser.add_argument("--tags", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = build_convnet_tagger(tmp / "convnet-tagger", width=args.width, num_tags=args.tags)
        paths = make_images(tmp, args.images)
        model = TaggerModel(folder)
        model.predict(np.zeros((args.batch_size, model.input_size, model.input_size, 3), np.float32))  # warm-up
        print(f"{len(paths)} images {sorted({f'{w}x{h} {f}' for w, h, f, _ in SHAPES})}, model input "
              f"{model.input_size}px, {len(model.labels.names)} tags, {os.cpu_count()} CPUs, {model.provider}")
        plain_s = plain_loop(paths, folder / "model.onnx", list(model.labels.names), model.labels.general)
        summary = tag_folder(paths, model, TagOptions(existing="overwrite", general_threshold=0.35,
                                                       include_characters=False),
                             batch_size=args.batch_size, workers=args.workers)
        assert summary.tagged == len(paths), summary.failed
        same = sum(set(p.with_suffix(".txt").read_text().split(", "))
                   == set(p.with_suffix(".plain.txt").read_text().split(", ")) for p in paths)
        parts = breakdown(paths, model, args.batch_size)
    plain_rate, ours_rate = len(paths) / plain_s, len(paths) / summary.seconds
    print(f"plain one-by-one loop: {plain_rate:6.2f} images/s ({plain_s:.2f} s)")
    print(f"our tagger:            {ours_rate:6.2f} images/s ({summary.seconds:.2f} s, batch {args.batch_size})")
    print(f"ratio:                 {ours_rate / plain_rate:6.2f}x")
    print(f"same tags as the plain loop on {same}/{len(paths)} images")
    print("per image, each stage alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    serial = parts["decode"] + parts["preprocess"] + parts["model_b1"]
    print(f"serial sum {serial:.1f} ms/img; ours {1e3 / ours_rate:.1f} ms/img; a perfect overlap on this machine "
          f"cannot beat the model alone at batch {args.batch_size}: {parts[f'model_b{args.batch_size}']:.1f} ms/img "
          f"(= at most {serial / parts[f'model_b{args.batch_size}']:.2f}x), and on few cores less, because decoding "
          "competes with the model for the same cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
