"""WD14 / WD-v3 ONNX tagger: preprocessing as the models expect, an onnxruntime session, and tagging a folder.

Images are decoded and preprocessed in a thread pool while the session runs the previous batch; v3 models (dynamic
batch dimension) run several images per call, models with a fixed batch of 1 one at a time.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.data.caption_files import MISSING, caption_path, read_caption
from lora_trainer.errors import LoraTrainerError, TaggerError
from lora_trainer.progress import CancelToken, ProgressInfo, ProgressTracker
from lora_trainer.tagging.caption_store import encode_caption
from lora_trainer.tagging.journaled_writes import CaptionChange, JournaledWriter, read_bytes
from lora_trainer.tagging.tag_format import TagOptions, TagScores, build_caption, model_tags, select_tags
from lora_trainer.tagging.tagger_input import list_images, prepare_image, prepared_batches
from lora_trainer.tagging.tagger_models import MODEL_FILE, TAGS_FILE, check_model_folder, read_labels

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def _choose_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"device: {device!r} is not one of {', '.join(DEVICES)}. Pick one of those.")
    if device != "cpu" and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


def _torch_sees_cuda() -> bool:
    torch = sys.modules.get("torch")  # only asked when already loaded (e.g. in the WebUI): importing costs seconds
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except (AttributeError, RuntimeError):
        return False


class TaggerModel:
    """A loaded tagger: an onnxruntime session plus its tag list.

    Attributes:
        folder (Path): the model folder. name (str): its name.
        labels (TagLabels): tag names and category indices.
        input_size (int): the model's square input side, from the session's input shape.
        fixed_batch (int | None): the model's batch size when fixed, None when dynamic.
        provider (str): the execution provider actually running (e.g. "CPUExecutionProvider").
        default_threshold (float): general threshold when the options give none (P=R of known models, else 0.35).
    """

    def __init__(self, folder: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
        """Load a model folder.

        Args:
            folder (str | os.PathLike): folder with model.onnx and selected_tags.csv.
            device (str, optional): "auto" (CUDA when onnxruntime has it, else CPU), "cuda" or "cpu".
            threads (int, optional): onnxruntime intra-op threads, defaults to onnxruntime's choice.

        Raises:
            TaggerError: missing files, not an NHWC image model, or output count != number of tags.
            ValueError: unknown `device`.
        """
        import onnxruntime as ort

        info = check_model_folder(folder)
        self.folder, self.name, self.default_threshold = info.path, info.name, info.default_threshold
        self.labels = read_labels(self.folder / TAGS_FILE)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle session threads sleep instead of spinning, leaving the cores to the image decoding threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        requested = _choose_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options, providers=requested)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise TaggerError(f"{self.folder / MODEL_FILE}: onnxruntime cannot load it ({exc}). Download the model "
                              "again; the file may be incomplete.") from exc
        self.provider = self.session.get_providers()[0]
        self._check_io()
        logger.info("tagger %s running on %s", self.name, self.provider)
        if self.provider != CUDA and (device == "cuda" or _torch_sees_cuda()):
            logger.warning("tagger %s: a CUDA GPU is there but onnxruntime runs on %s (available providers: %s). "
                           "Install onnxruntime-gpu matching your CUDA version to tag on the GPU.",
                           self.name, self.provider, ", ".join(ort.get_available_providers()))

    def _check_io(self) -> None:
        model_file = self.folder / MODEL_FILE
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise TaggerError(f"{model_file}: input shape {shape} is not [batch, size, size, 3] (NHWC). Use a WD14 "
                              "tagger model (e.g. SmilingWolf/wd-vit-tagger-v3).")
        self.input_name, self.input_size = inp.name, shape[1]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        n_out = out.shape[-1] if out.shape else None
        if isinstance(n_out, int):
            self._check_count(n_out)

    def _check_count(self, n_out: int) -> None:
        if n_out != len(self.labels.names):
            raise TaggerError(f"{self.folder}: model.onnx gives {n_out} outputs but selected_tags.csv lists "
                              f"{len(self.labels.names)} tags. Put the selected_tags.csv of this same model "
                              "in the folder (download both files from the same repo).")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the model.

        Args:
            batch (np.ndarray): [N, size, size, 3] float32 from `prepare_image`.

        Returns:
            np.ndarray: [N, T] probabilities, in the order of `labels.names`.

        Raises:
            TaggerError: onnxruntime failed (e.g. out of memory), or the output count != number of tags.
        """
        step = self.fixed_batch or len(batch)
        try:
            outs = [self._run_padded(batch[i:i + step], step) for i in range(0, len(batch), step)]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise TaggerError(f"{self.folder / MODEL_FILE}: running the model on {len(batch)} image(s) at once "
                              f"failed on {self.provider} ({exc}). Lower the batch size (out of memory?) or run "
                              "on the CPU.") from exc
        probs = np.concatenate(outs).astype(np.float32, copy=False)
        self._check_count(probs.shape[-1])
        return probs

    def _run_padded(self, part: np.ndarray, step: int) -> np.ndarray:
        """One session call; a short last slice for a fixed batch size is padded with zeros, then trimmed."""
        n = len(part)
        if n < step:
            part = np.concatenate([part, np.zeros((step - n, *part.shape[1:]), part.dtype)])
        return self.session.run(None, {self.input_name: part})[0][:n]

    def scores(self, probs: np.ndarray, options: TagOptions) -> TagScores:
        """Select one image's tags from its probabilities ([T], a row of `predict`)."""
        labels = self.labels
        return select_tags(probs, labels.names, labels.rating, labels.general, labels.character, options,
                           self.default_threshold)

    def tag_images(self, images: Iterable[Image.Image], options: TagOptions | None = None) -> list[TagScores]:
        """Tag images already in memory (e.g. a preview in the UI).

        Args:
            images (Iterable[PIL.Image.Image]): any mode.
            options (TagOptions, optional): thresholds, defaults to TagOptions().

        Returns:
            list[TagScores]: one per image.
        """
        options = options or TagOptions()
        arrays = [prepare_image(im, self.input_size) for im in images]
        if not arrays:
            return []
        return [self.scores(p, options) for p in self.predict(np.stack(arrays))]


@dataclass
class TagSummary:
    """What `tag_folder` did.

    Attributes:
        tagged (int): captions written. skipped (int): images whose caption was kept (existing="skip").
        failed (list[tuple[Path, str]]): images (or captions) that could not be used, with the reason.
        provider (str): execution provider used. seconds (float): wall time. cancelled (bool): stopped early.
        interrupted (str | None): why writing stopped (disk full), with the commands that undo or complete it.
        journal (Path | None): the caption journal that recorded the written captions (``tags --undo``).
    """

    tagged: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    provider: str = ""
    seconds: float = 0.0
    cancelled: bool = False
    interrupted: str | None = None
    journal: Path | None = None


def _plan_one(path: Path, scores: TagScores, options: TagOptions) -> tuple[CaptionChange | None, str | None]:
    """The caption change for one tagged image. Returns (change, error); (None, None) when the caption is kept."""
    target = Path(caption_path(path, options.caption_extension))
    existing = None
    try:
        before = read_bytes(target)
    except OSError as exc:
        return None, f"{target}: cannot be read ({exc.strerror}). Move it away or make it a readable file."
    if before is not None:
        current = read_caption(target)
        if current.problem not in (None, MISSING) and options.existing in ("append", "prepend"):
            return None, current.problem
        existing = current.text
    text = build_caption(model_tags(scores, options), existing, options)
    if text is None:
        return None, None
    return CaptionChange(target, before, encode_caption(text), path), None


def _journal_root(folder_or_paths, paths: list[Path]) -> Path | None:
    if isinstance(folder_or_paths, (str, os.PathLike)):
        return Path(folder_or_paths)
    return Path(os.path.commonpath([p.parent for p in paths])) if paths else None


def _write_batch(writer: JournaledWriter, changes: list[CaptionChange], summary: TagSummary) -> None:
    todo = [c for c in changes if c.after != c.before]
    summary.tagged += len(changes) - len(todo)  # the same caption again: nothing to write
    try:
        report = writer.write(todo)
    except (LoraTrainerError, OSError) as exc:  # the journal: nothing of this run was written yet
        summary.interrupted = str(exc)
        return
    summary.tagged += len(report.written)
    summary.failed += [(c.key, f"{c.path}: caption not written ({message}).") for c, message in report.failed]
    summary.interrupted = report.interrupted


def tag_folder(folder_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
               model: TaggerModel | str | os.PathLike, options: TagOptions | None = None, *, batch_size: int = 8,
               workers: int | None = None, recursive: bool = False, jpeg_draft: bool = False,
               progress: Callable[[ProgressInfo], None] | None = None,
               cancel: CancelToken | None = None, journal_root: str | os.PathLike | None = None) -> TagSummary:
    """Tag images and write their caption files (atomically, via caption_store).

    Args:
        folder_or_paths: a folder of images, or image paths.
        model (TaggerModel | str | os.PathLike): a loaded model or its folder.
        options (TagOptions, optional): thresholds and output options, defaults to TagOptions().
        batch_size (int, optional): images per session call for dynamic-batch models, defaults to 8.
        workers (int, optional): decode/preprocess threads, defaults to min(4, CPU count).
        recursive (bool, optional): include sub-folders of a folder, defaults to False.
        jpeg_draft (bool, optional): decode large JPEGs at a reduced scale (still >= 1.5x the model's input side,
            see `tagger_input.load_for_tagging`): several times faster on big photos, model input off by about
            one grey level, so a tag right at the threshold may flip. Defaults to False (the reference decoding).
        progress (callable, optional): called with a ProgressInfo (rate, ETA) after each batch.
        cancel (CancelToken, optional): checked between batches; the summary then says `cancelled`.
        journal_root (str | os.PathLike, optional): the dataset folder whose caption journal records the writes
            (``tags DIR --undo`` takes the run back). Defaults to the folder given, or the images' common folder.

    Returns:
        TagSummary: counts, failures with reasons, provider and time. Bad images are reported, never raised;
        a full disk stops tagging with `interrupted` set (the message says how to undo or complete).

    Raises:
        TaggerError: the model cannot be loaded or run, or the folder does not exist.
        DatasetError: the caption journal is unreadable or corrupt (nothing was written).
    """
    start = time.monotonic()
    options = options or TagOptions()
    images = list_images(folder_or_paths, recursive)
    root = Path(journal_root) if journal_root is not None else _journal_root(folder_or_paths, images)
    writer = JournaledWriter(root, "tag") if root is not None else None  # a corrupt journal stops us here
    tagger = model if isinstance(model, TaggerModel) else TaggerModel(model)
    summary = TagSummary(provider=tagger.provider)
    todo = []
    for path in images:
        if options.existing == "skip" and os.path.exists(caption_path(path, options.caption_extension)):
            summary.skipped += 1
        else:
            todo.append(path)
    batch = max(1, tagger.fixed_batch or batch_size)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    tracker = ProgressTracker(len(todo))
    for chunk in prepared_batches(todo, tagger.input_size, batch, workers, cancel, jpeg_draft):
        good = [(path, array) for path, array, _ in chunk if array is not None]
        summary.failed += [(path, error) for path, array, error in chunk if array is None]
        probs = tagger.predict(np.stack([a for _, a in good])) if good else []
        changes = []
        for (path, _), row in zip(good, probs):
            change, error = _plan_one(path, tagger.scores(row, options), options)
            if change is not None:
                changes.append(change)
            elif error:
                summary.failed.append((path, error))
            else:
                summary.skipped += 1
        _write_batch(writer, changes, summary)
        info = tracker.update(len(chunk))
        if progress is not None:
            progress(info)
        if summary.interrupted:
            break
    if writer is not None:
        writer.finish()
        summary.journal = writer.journal.path if writer.changed else None
    summary.cancelled = cancel is not None and cancel.cancelled and tracker.done < tracker.total
    summary.seconds = time.monotonic() - start
    logger.info("tagged %d, skipped %d, failed %d in %.1f s on %s", summary.tagged, summary.skipped,
                len(summary.failed), summary.seconds, summary.provider)
    return summary
