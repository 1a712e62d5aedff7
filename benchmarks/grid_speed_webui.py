"""Strength-grid speed inside a real AUTOMATIC1111 WebUI: the LoRA in memory against the path users take today.

Starts the WebUI on CPU with the tiny SD1 test model (the harness of tests/webui: A1111_DIR, A1111_PYTHON), trains
a LoRA through our API, then renders a grid of 6 strengths (0, 0.2, ..., 1) x 2 seeds three ways, all over HTTP:
    base model   12 plain txt2img calls (the reference time per image)
    in memory    one `POST /lora_trainer/v1/test/grid` (the WebUI's txt2img on the LoRA in memory; strength 0
                 renders the base model once per seed)
    by name      12 txt2img calls with `<lora:NAME:S>` (the built-in Lora extension reads the file and merges
                 `S * delta` into the weights at every new strength)
Each way runs --repeat times, taking turns; the table shows the best total, the time per cell and per cell against
the base model, and the load average. Nothing here is asserted. The WebUI logs at INFO, as users run it (at DEBUG
a grid also hashes every weight before and after: about 5 s on the full-size model).

On Linux the WebUI runs with a steady glibc heap (`steady_heap.py`, unless GLIBC_TUNABLES is set or
--default-malloc): with glibc's defaults, a full-size txt2img on the CPU took 13.8 s after training and 9.0 s after a
grid, the same call; with it, 7.7 and 7.0 s with about a thousand page faults each.

With --full-size the model is the full-size SD1 architecture with random weights
(`lora_trainer.testing.random_models`, kept in --cache-dir) and a text-encoder folder written offline beside it
(full-size CLIP-L config, tokenizer from OpenCLIP's BPE file) that its yaml points the WebUI at; on CPU the WebUI
runs it in float32 (--no-half).

    A1111_DIR=/path/to/webui python benchmarks/grid_speed_webui.py --steps 20 --size 64
    A1111_DIR=/path/to/webui python benchmarks/grid_speed_webui.py --full-size --cache-dir /tmp/cache --steps 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "webui"))

from steady_heap import use_steady_heap  # noqa: E402
from webui_harness import CPU_FLAGS, STAMP, Installation, install_requirements, start_webui, webui_python  # noqa: E402

STRENGTHS = (0, 0.2, 0.4, 0.6, 0.8, 1)
SEEDS = (1, 2)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--full-size", action="store_true", help="the full-size SD1 architecture, random weights")
    parser.add_argument("--default-malloc", action="store_true", help="run the WebUI with glibc's default heap")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="folder for the --full-size model, default: ~/.cache/lora_trainer/benchmarks")
    return parser.parse_args()


def _dataset(root: Path) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "2_box"
    folder.mkdir(parents=True)
    for i in range(3):
        image = Image.new("RGB", (64, 64), (20, 90, 180))
        ImageDraw.Draw(image).rectangle([8 * i, 8, 8 * i + 30, 38], fill=(230, 40, 20))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"box, red, item{i}", encoding="utf-8")
    return root


def _full_size_model(a1111: Path, cache: Path) -> SimpleNamespace:
    """The full-size random SD1 checkpoint, and a yaml whose text encoder comes from a local folder (offline)."""
    import shutil

    import yaml

    from lora_trainer.models.tokenizer import write_clip_tokenizer
    from lora_trainer.testing.random_models import build_random_model

    model = build_random_model("sd1", cache / "full_sd1")
    text_encoder = cache / "full_sd1_webui" / "text_encoder"
    if not (text_encoder / "vocab.json").is_file():
        write_clip_tokenizer(text_encoder)
    shutil.copyfile(ROOT / "lora_trainer" / "models" / "configs" / "sd1" / "text_encoder" / "config.json",
                    text_encoder / "config.json")
    config = yaml.safe_load((a1111 / "configs" / "v1-inference.yaml").read_text(encoding="utf-8"))
    config["model"]["params"]["cond_stage_config"]["params"] = {"version": str(text_encoder)}
    config_file = cache / "full_sd1_webui" / "full_sd1.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    return SimpleNamespace(checkpoint=model.checkpoint, yaml=config_file)


def _model(args, a1111: Path, work: Path):
    if not args.full_size:
        from lora_trainer.testing.tiny_models import build_tiny_model

        return build_tiny_model("sd1", work / "sd1")
    cache = args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_trainer" \
        / "benchmarks"
    return _full_size_model(a1111, cache)


def _ways(webui, name: str, settings: dict) -> dict:
    def base():
        for _ in STRENGTHS:
            for seed in SEEDS:
                webui.call("/sdapi/v1/txt2img", {"prompt": "box, red", "seed": seed, **settings})

    def in_memory():
        answer = webui.call("/lora_trainer/v1/test/grid", {"prompt": "box, red", "strengths": list(STRENGTHS),
                                                          "seeds": list(SEEDS), "snapshots": ["in memory"],
                                                          **settings})
        Path(answer["path"]).unlink()

    def by_name():
        for strength in STRENGTHS:
            for seed in SEEDS:
                webui.call("/sdapi/v1/txt2img", {"prompt": f"box, red <lora:{name}:{strength:g}>", "seed": seed,
                                                 **settings})

    return {"base model": base, "in memory": in_memory, "by name": by_name}


def main() -> int:
    args = _arguments()
    heap = use_steady_heap(args.default_malloc)
    a1111 = Path(os.environ["A1111_DIR"])
    install = Installation(a1111)
    name = f"lt_bench_{STAMP}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = _model(args, a1111, work)
        webui = None
        try:
            install.install_extension()
            checkpoint = install.install_checkpoint(model, f"lt_bench_sd1_{STAMP}")
            install_requirements(webui_python(a1111))
            # INFO, as users run it: at DEBUG the grid also hashes every weight before and after
            flags = [flag for flag in CPU_FLAGS if flag not in ("--loglevel", "DEBUG")]
            webui = start_webui(a1111, webui_python(a1111), work / "webui.log", checkpoint, flags=flags)
            status = webui.train({"train_data_dir": str(_dataset(work / "data")), "resolution": "64,64",
                                  "output_name": name, "max_train_steps": 4, "network_dim": 16, "network_alpha": 16,
                                  "cache_latents": True, "seed": 1, "save_precision": "float"})
            assert status["state"] == "finished", status["message"]
            settings = {"steps": args.steps, "width": args.size, "height": args.size, "sampler_name": args.sampler,
                        "cfg_scale": 7}
            ways = _ways(webui, name, settings)
            best = {way: float("inf") for way in ways}
            for _ in range(args.repeat):
                for way, run in ways.items():
                    start = time.perf_counter()
                    run()
                    best[way] = min(best[way], time.perf_counter() - start)
        except Exception:
            if webui is not None:
                print("\n".join(webui.log_lines()[-40:]), file=sys.stderr)
            raise
        finally:
            if webui is not None:
                webui.stop()
            for path in (a1111 / "models" / "Lora").glob(f"{name}*"):
                path.unlink()
            install.remove()
    cells = len(STRENGTHS) * len(SEEDS)
    per_base = best["base model"] / cells
    print(f"WebUI grid speed: {len(STRENGTHS)} strengths x {len(SEEDS)} seeds, "
          f"{'full-size SD1 (random weights, fp32)' if args.full_size else 'tiny SD1'}, {args.size} px, "
          f"{args.steps} steps, {args.sampler}, LoRA rank 16, best of {args.repeat}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; WebUI heap: {heap}")
    print(f"{'way':<12} {'total s':>8} {'s/cell':>8} {'vs base':>8}")
    for way, seconds in best.items():
        print(f"{way:<12} {seconds:8.2f} {seconds / cells:8.3f} {seconds / cells / per_base:8.2f}")
    print(f"in memory is {best['by name'] / best['in memory']:.2f}x faster than loading by name")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
