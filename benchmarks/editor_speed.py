"""Tag editor speed on a synthetic dataset: load, batch edit over all images, undo, frequency, save, analysis.

Targets (10,000 captions of ~30 tags): load < 1 s, a batch edit over all < 0.3 s, undo < 0.1 s.

    python benchmarks/editor_speed.py [--images 10000] [--tags 30] [--folders 4]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_trainer.tagging import TagEditor, analyze

TARGETS = {"load": 1.0, "add_tags (all)": 0.3, "undo": 0.1}


def make_dataset(root: Path, images: int, tags: int, folders: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"tag {i}" for i in range(2000)]
    for f in range(folders):
        (root / f"{f + 1}_concept{f}").mkdir()
    for i in range(images):
        folder = root / f"{i % folders + 1}_concept{i % folders}"
        caption = ", ".join([f"concept{i % folders}"] + rng.sample(vocab, tags - 1))
        (folder / f"{i:05d}.txt").write_text(caption, encoding="utf-8")
        (folder / f"{i:05d}.png").write_bytes(b"")


def timed(label: str, fn, figures: dict):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    figures[label] = (time.perf_counter() - start, time.process_time() - start_cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--tags", type=int, default=30)
    parser.add_argument("--folders", type=int, default=4)
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed("generate files", lambda: make_dataset(root, args.images, args.tags, args.folders), figures)
        editor = timed("load", lambda: TagEditor.load(root), figures)
        timed("tag_frequency", lambda: editor.tag_frequency(), figures)
        timed("filter (2 tags, any)", lambda: editor.filter(["tag 1", "tag 2"], mode="any"), figures)
        result = timed("add_tags (all)", lambda: editor.add_tags(["trigger"], scope="all", front=True), figures)
        timed("tag_frequency after it", lambda: editor.tag_frequency(), figures)
        timed("undo", editor.undo, figures)
        timed("redo", editor.redo, figures)
        timed("replace regex (all)", lambda: editor.replace(r"^tag (\d)$", r"small \1", scope="all", regex=True), figures)
        timed("remove_tags (all)", lambda: editor.remove_tags(["tag 7", "tag 8"], scope="all"), figures)
        timed("sort_tags (all)", lambda: editor.sort_tags(scope="all", keep=1), figures)
        timed("analyze", lambda: analyze(editor.records()), figures)
        saved = timed("save (all changed)", editor.save, figures)
    print(f"{args.images} captions x {args.tags} tags in {args.folders} folders; add_tags changed {result.n_changed}, "
          f"save wrote {len(saved.written)}")
    width = max(len(k) for k in figures)
    failed = False
    print(f"{'':<{width}}  {'wall':>9}     {'cpu':>9}   (cpu time is less disturbed by other load on the machine)")
    for label, (seconds, cpu) in figures.items():
        target = TARGETS.get(label)
        note = ""
        if target is not None:
            ok = seconds < target
            failed |= not ok
            note = f"  (target < {target:.1f} s wall: {'ok' if ok else 'MISSED'})"
        print(f"{label:<{width}}  {seconds * 1000:9.1f} ms  {cpu * 1000:9.1f} ms{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
