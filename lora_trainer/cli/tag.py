"""`python -m lora_trainer tag DIR --model-dir PATH`: tag images with a WD14 / WD-v3 tagger, write caption files.

    python -m lora_trainer tag train --tagger-dir models/tagger --download wd-vit-tagger-v3 \
        --trigger "mychar" --exclude "long hair, blue eyes" --existing overwrite

DIR may be a dataset root: the images in its ``N_concept`` folders are tagged too (--recursive takes every
sub-folder). Captions are written through the caption journal of DIR, so ``tags DIR --undo`` takes a run back.

Exit status: 0 when every image was tagged or skipped, 1 when some images failed (listed), none were found, or
writing stopped (disk full: the message says how to undo or complete it), 2 on a usage or model error.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lora_trainer.errors import LoraTrainerError
from lora_trainer.progress import ProgressInfo, format_seconds

_BAR_WIDTH = 30


def add_parser(sub) -> None:
    p = sub.add_parser("tag", help="tag images with a WD14 / WD-v3 ONNX tagger and write caption files",
                       description="Tag every image in DIR and write a caption file beside each one.")
    p.add_argument("dir", type=Path, help="folder of images")
    model = p.add_argument_group("model")
    model.add_argument("--model-dir", type=Path, help="tagger model folder (model.onnx + selected_tags.csv)")
    model.add_argument("--tagger-dir", type=Path, help="folder of tagger model folders (for --model / --download)")
    model.add_argument("--model", help="model folder name inside --tagger-dir, e.g. wd-vit-tagger-v3")
    model.add_argument("--download", metavar="NAME", help="download SmilingWolf/NAME into --tagger-dir first "
                       "(skipped when already there), e.g. wd-vit-tagger-v3")
    model.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: auto")
    tags = p.add_argument_group("tags")
    tags.add_argument("--threshold", type=float, help="general tag threshold (default: the model's P=R value, "
                      "0.35 for unknown models)")
    tags.add_argument("--character-threshold", type=float, default=0.85, help="default: 0.85")
    tags.add_argument("--mcut", action="store_true", help="MCut thresholds for general and character tags")
    tags.add_argument("--general-mcut", action="store_true", help="MCut threshold for general tags only")
    tags.add_argument("--character-mcut", action="store_true", help="MCut threshold (floor 0.15) for characters")
    tags.add_argument("--no-characters", action="store_true", help="leave character tags out")
    tags.add_argument("--rating", action="store_true", help="write the most likely rating tag")
    tags.add_argument("--exclude", action="append", default=[], metavar="TAGS",
                      help='tags never written: "a, b" or repeat the option')
    tags.add_argument("--trigger", action="append", default=[], metavar="TAGS",
                      help='tags put first, in this order: "mychar, style" or repeat the option')
    tags.add_argument("--append", action="store_true", help="put the --trigger tags last instead")
    out = p.add_argument_group("captions")
    out.add_argument("--existing", choices=("skip", "overwrite", "append", "prepend"), default="skip",
                     help="what to do with an existing caption (default: skip)")
    out.add_argument("--no-underscore-replace", action="store_true", help="keep underscores in tags")
    out.add_argument("--escape", action="store_true", help=r"escape parentheses as \( \) (WebUI prompts)")
    out.add_argument("--sort", choices=("confidence", "alpha"), default="confidence", help="default: confidence")
    out.add_argument("--keep-duplicates", action="store_true", help="do not remove repeated tags")
    out.add_argument("--ext", default=".txt", help="caption extension (default: .txt)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    run_group.add_argument("--workers", type=int, help="image decoding threads (default: min(4, CPUs))")
    run_group.add_argument("--recursive", action="store_true",
                           help="include every sub-folder (N_concept folders inside DIR are always included)")
    run_group.add_argument("--fast-jpeg", action="store_true",
                           help="decode large JPEGs at a reduced scale (>= 1.5x the model input): several times "
                                "faster on big photos; a tag right at the threshold may flip")


def _split(values: list[str]) -> tuple[str, ...]:
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def _options(args):
    from lora_trainer.data.caption_files import check_caption_extension
    from lora_trainer.tagging.tag_format import TagOptions

    check_caption_extension(args.ext, "--ext")  # first: nothing is loaded or written with a wrong extension

    return TagOptions(
        general_threshold=args.threshold, character_threshold=args.character_threshold,
        general_mcut=args.mcut or args.general_mcut, character_mcut=args.mcut or args.character_mcut,
        include_characters=not args.no_characters, include_rating=args.rating,
        replace_underscores=not args.no_underscore_replace, escape_parentheses=args.escape,
        exclude_tags=_split(args.exclude), trigger_tags=_split(args.trigger),
        trigger_position="append" if args.append else "prepend", sort=args.sort, existing=args.existing,
        remove_duplicates=not args.keep_duplicates, caption_extension=args.ext)


def _model_folder(args) -> Path:
    from lora_trainer.tagging.tagger_models import download_model, find_models, model_info

    if args.model_dir is not None:
        return args.model_dir
    name = args.download or args.model
    if args.tagger_dir is None:
        raise ValueError("--model-dir: no tagger model given. Pass --model-dir FOLDER, or --tagger-dir DIR with "
                         "--model NAME or --download NAME.")
    if args.download and not model_info(args.tagger_dir / args.download).ready:
        return download_model(args.download, args.tagger_dir)
    if name:
        return args.tagger_dir / name
    ready = [m for m in find_models(args.tagger_dir) if m.ready]
    if len(ready) != 1:
        found = ", ".join(m.name for m in ready) or "none"
        raise ValueError(f"--tagger-dir {args.tagger_dir}: {len(ready)} ready models ({found}). Pick one with "
                         "--model NAME, or get one with --download wd-vit-tagger-v3.")
    return ready[0].path


class _Bar:
    """A one-line progress bar with rate and ETA on stderr."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, info: ProgressInfo) -> None:
        filled = int(_BAR_WIDTH * info.done / info.total) if info.total else _BAR_WIDTH
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self.stream.write(f"\rtagging [{bar}] {info.describe('img')}")
        if info.done >= info.total:
            self.stream.write("\n")
        self.stream.flush()


def _images(args) -> list[Path]:
    """What to tag: DIR's images; with N_concept folders inside, theirs too; everything below with --recursive."""
    from lora_trainer.tagging.tagger_input import concept_folders, dataset_images, list_images

    concepts = [] if args.recursive else concept_folders(args.dir)
    if not concepts:
        return list_images(args.dir, args.recursive)
    names = ", ".join(p.name for p in concepts[:5]) + (f" and {len(concepts) - 5} more" if len(concepts) > 5 else "")
    print(f"{args.dir} holds {len(concepts)} N_concept folders ({names}): tagging the images in all of them "
          "(--recursive also takes every other sub-folder)", file=sys.stderr)
    return dataset_images(args.dir)


def _no_images_hint(folder: Path) -> str:
    from lora_trainer.tagging.tagger_input import list_images

    below = len(list_images(folder, recursive=True)) if folder.is_dir() else 0
    if below:
        return (f"{folder}: no images directly in this folder, {below} in its sub-folders. Add --recursive to tag "
                "them, or name the folder that holds them.")
    return f"{folder}: no images found (png, jpg, jpeg, webp, bmp, gif). Give the folder that holds the images."


def run(args) -> int:
    from lora_trainer.tagging.journaled_writes import command
    from lora_trainer.tagging.tagger import TaggerModel, tag_folder

    try:
        options = _options(args)
        images = _images(args)
        if not images:
            print(f"error: {_no_images_hint(args.dir)}", file=sys.stderr)
            return 1
        model = TaggerModel(_model_folder(args), device=args.device)
        print(f"model {model.name} ({len(model.labels.names)} tags, input {model.input_size}px) on {model.provider}",
              file=sys.stderr)
        summary = tag_folder(images, model, options, batch_size=args.batch_size, workers=args.workers,
                             jpeg_draft=args.fast_jpeg, journal_root=args.dir,
                             progress=_Bar())
    except (LoraTrainerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = summary.tagged + len(summary.failed)
    rate = f", {done / summary.seconds:.2f} img/s" if summary.seconds > 0 and done else ""
    print(f"tagged {summary.tagged}, skipped {summary.skipped} (caption kept), failed {len(summary.failed)} "
          f"in {format_seconds(summary.seconds)}{rate} on {summary.provider}")
    for path, reason in summary.failed:
        print(f"  failed: {reason}" if str(path) in reason else f"  failed: {path}: {reason}")
    if summary.interrupted:
        print(f"error: {summary.interrupted}")
    elif summary.journal is not None:
        print(f"recorded in {summary.journal}: undo with `{command(args.dir, '--undo')}`")
    return 1 if summary.failed or summary.interrupted else 0


