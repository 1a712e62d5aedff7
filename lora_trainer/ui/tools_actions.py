"""The jobs of the Tools panel and the tools API: block weights, merge, resize, bake, extract, checkpoint merge,
prune and inspect on files in the host's Lora and Stable-diffusion folders. No gradio here.

Every job answers a `ToolReport` (a JSON-ready summary); without an output name it only previews what it would
do (block table, ranks, retained energy) and writes nothing. Writing jobs run inside the host's job system (the
WebUI: its progress bar, Interrupt and generation lock) and never touch the model the host has loaded; a new LoRA
is made visible to the host at once (`refresh_loras`). Names are resolved in the host's folders: a relative
LoRA name in the Lora folder, a relative checkpoint name in the Stable-diffusion folder; absolute paths as given.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lora_trainer.errors import LoraTrainerError
from lora_trainer.ui.folder_access import PolicySource, check_path

logger = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors",)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
TOOLS = ("lbw", "merge", "resize", "bake", "extract", "ckpt-merge", "prune", "inspect")


class ToolCancelled(LoraTrainerError):
    """A job stopped by Cancel or the WebUI's Interrupt; nothing was written."""


@dataclass
class ToolProgress:
    """Progress of one job, written by the job's thread and read by the panel; `cancel` stops it at the next step.

    Attributes:
        done (int): steps done (tensors or modules).
        total (int): steps in all (0 until the job knows).
        cancel (threading.Event): set to stop the job (no file is written).
    """

    done: int = 0
    total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class ToolReport:
    """What a job did, or would do (a preview).

    Attributes:
        tool (str): one of `TOOLS`.
        written (str | None): the new file, None for a preview or inspect.
        summary (dict): JSON-ready figures of the job (see each `Tools` method).
    """

    tool: str
    written: str | None
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "written": self.written, "preview": self.written is None, **self.summary}


def split_spec(spec: str) -> tuple[str, float, str | None]:
    """`name[:ratio[:weights]]` -> (name, ratio, weights); a name may itself hold ':' (drive letters).

    Args:
        spec (str): one line of a merge or bake list.

    Returns:
        tuple[str, float, str | None]: the file name, its ratio (default 1) and block weights (preset or vector).
    """
    parts = spec.strip().split(":")
    for i in range(1, len(parts)):
        try:
            ratio = float(parts[i])
        except ValueError:
            continue
        return ":".join(parts[:i]).strip(), ratio, (":".join(parts[i + 1:]).strip() or None)
    return spec.strip(), 1.0, None


def parse_specs(text: str) -> list[tuple[str, float, str | None]]:
    """The non-empty lines of a file list (`name:ratio[:weights]` each; `#` starts a comment line)."""
    lines = [line.strip() for line in (text or "").splitlines()]
    return [split_spec(line) for line in lines if line and not line.startswith("#")]


def _listing(folder: Path | None, suffixes: tuple[str, ...]) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith("."))
    return sorted(names, key=str.lower)


@dataclass(frozen=True)
class ToolFolders:
    """Where the tools find and put files.

    Attributes:
        lora_dir (Path): the host's Lora folder (LoRA inputs and outputs).
        checkpoint_dir (Path | None): the host's Stable-diffusion folder (checkpoint inputs and outputs).
        webui_dir (Path | None): a WebUI root whose LoRA Block Weight preset file is read, when installed.
        policy (PolicySource): the folder rule every resolved path is checked by (None: unrestricted).
    """

    lora_dir: Path
    checkpoint_dir: Path | None = None
    webui_dir: Path | None = None
    policy: PolicySource = None

    @classmethod
    def of_host(cls, host, policy: PolicySource = None) -> ToolFolders:
        """The folders a host gives (`lora_dir()`, `checkpoint_dir()`, and `webui_dir()` where it has one)."""
        checkpoint = host.checkpoint_dir() if hasattr(host, "checkpoint_dir") else None
        webui = host.webui_dir() if hasattr(host, "webui_dir") else None
        return cls(Path(host.lora_dir()), Path(checkpoint) if checkpoint else None, Path(webui) if webui else None,
                   policy)

    def lora_path(self, name: str | Path, key: str = "file") -> Path:
        """A LoRA name resolved in the Lora folder (absolute paths as given), checked by the folder rule."""
        path = _in_folder(name, self.lora_dir)
        check_path(self.policy, key, path)
        return path

    def checkpoint_path(self, name: str | Path, key: str = "checkpoint") -> Path:
        """A checkpoint name resolved in the Stable-diffusion folder (absolute paths as given), checked by the rule."""
        path = _in_folder(name, self.checkpoint_dir or self.lora_dir)
        check_path(self.policy, key, path)
        return path

    def loras(self) -> list[str]:
        """The `.safetensors` files under the Lora folder, relative to it."""
        return _listing(self.lora_dir, LORA_SUFFIXES)

    def checkpoints(self) -> list[str]:
        """The `.safetensors` / `.ckpt` files under the Stable-diffusion folder, relative to it."""
        return _listing(self.checkpoint_dir, CHECKPOINT_SUFFIXES)


def _in_folder(name: str | Path, folder: Path) -> Path:
    text = str(name).strip()
    if not text:
        raise ValueError("file: no file chosen. Pick a file from the list or type its name.")
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


class LoraTools:
    """The LoRA file tools on one host's folders (`tools_ckpt_actions.Tools` adds the checkpoint tools). Every
    method returns a `ToolReport`; `out=None` previews.

    Args:
        host (Host): gives the folders (`lora_dir`, `checkpoint_dir`), the job system and `refresh_loras`.
        folder_policy (PolicySource, optional): the host's folder rule for every path a job names (a WebUI on the
            network), defaults to None (unrestricted).
    """

    def __init__(self, host, folder_policy: PolicySource = None):
        self.host = host
        self.folder_policy = folder_policy

    @property
    def folders(self) -> ToolFolders:
        """Read at each call: the WebUI's folders (and its folder rule) may change with its settings."""
        return ToolFolders.of_host(self.host, self.folder_policy)

    def presets(self):
        """Built-in presets, then LoRA Block Weight's file in the WebUI (when installed)."""
        from lora_trainer.tools.presets import load_presets

        return load_presets((), self.folders.webui_dir)

    # -- running -----------------------------------------------------------------------------------------------
    def _output(self, out, inputs: list[Path], checkpoint: bool, overwrite: bool) -> Path:
        from lora_trainer.tools.output_path import check_output

        folders = self.folders
        path = folders.checkpoint_path(out, "out") if checkpoint else folders.lora_path(out, "out")
        return check_output(path, inputs, overwrite=overwrite)

    def _run(self, title: str, job: Callable[[Callable[[int, int], None]], Any],
             progress: ToolProgress | None) -> Any:
        """Run `job(step)` as a host job; `step(done, total)` reports progress and stops on Cancel / Interrupt."""
        progress = progress or ToolProgress()
        with self.host.job(title, 1) as handle:
            def step(done: int, total: int) -> None:
                progress.done, progress.total = done, total
                handle.progress(done, total)
                if progress.cancel.is_set() or handle.interrupted:
                    raise ToolCancelled(f"{title}: cancelled; no file was written. Start it again when ready.")
            step(0, 0)
            return job(step)

    def _wrote_lora(self, path: Path) -> None:
        try:
            self.host.refresh_loras()
        except Exception:  # the file is written; a failed list refresh must not turn the job into an error
            logger.exception("refreshing the Lora list after writing %s failed", path)

    # -- LoRA files ----------------------------------------------------------------------------------------------
    def lbw(self, file: str, weights: str, out: str | None = None, overwrite: bool = False,
            progress: ToolProgress | None = None) -> ToolReport:
        """Block weights (a preset name or 12/17/20/26 values) baked into a new LoRA.

        Args:
            file (str): the LoRA (a name in the Lora folder or a path).
            weights (str): preset name or comma-separated vector.
            out (str, optional): the new file; None previews.
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: architecture, vector, blocks {slot: {modules, weight}}, dropped modules, zero-filled slots.
        """
        from lora_trainer.tools import read_lora
        from lora_trainer.tools.block_weights import apply_block_weights, weighted_state_dict
        from lora_trainer.tools.presets import resolve_weights

        source = self.folders.lora_path(file)
        lora = read_lora(source)
        vector = resolve_weights(weights or "", lora.architecture, self.presets())
        if out is None:
            result = weighted_state_dict(lora, vector)[1]
        else:
            path = self._output(out, [source], False, overwrite)
            result = self._run("LoRA block weights", lambda _: apply_block_weights(lora, vector, path), progress)
            self._wrote_lora(path)
        summary = {"source": str(source), "architecture": lora.architecture, "vector": vector.text(),
                   "blocks": {slot: {"modules": n, "weight": w} for slot, (n, w) in result.by_block.items()},
                   "dropped_modules": len(result.dropped), "zero_filled_blocks_used": list(result.zero_filled_used)}
        return ToolReport("lbw", str(result.path) if result.path else None, summary)

    def merge(self, inputs: list[tuple[str, float, str | None]], out: str | None = None, rank: int | None = None,
              conv_rank: int | None = None, precision: str = "float", overwrite: bool = False,
              progress: ToolProgress | None = None) -> ToolReport:
        """Merge LoRAs: exact (rank concatenation) or by SVD to `rank`.

        Args:
            inputs (list[tuple[str, float, str | None]]): (file, ratio, block weights or None) per LoRA.
            out (str, optional): the new file; None previews.
            rank (int, optional): SVD merge to this rank, defaults to None (exact).
            conv_rank (int, optional): rank of kxk convs in an SVD merge, defaults to `rank`.
            precision (str, optional): "float", "fp16" or "bf16", defaults to "float".
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: mode, modules, ranks, retained energy overall and by block, largest relative error.
        """
        from lora_trainer.tools import read_lora
        from lora_trainer.tools.merge import MergeInput, merge_loras, merge_state_dict
        from lora_trainer.tools.output import precision_dtype
        from lora_trainer.tools.presets import resolve_weights

        if not inputs:
            raise ValueError("merge: no LoRA files given. Add at least one file with its ratio.")
        book, items, sources = self.presets(), [], []
        for name, ratio, weights in inputs:
            sources.append(self.folders.lora_path(name))
            lora = read_lora(sources[-1])
            items.append(MergeInput(lora, ratio, resolve_weights(weights, lora.architecture, book) if weights
                                    else None))
        if out is None:
            result = merge_state_dict(items, rank, conv_rank, precision_dtype(precision))[1]
        else:
            path = self._output(out, sources, False, overwrite)
            result = self._run("LoRA merge", lambda _: merge_loras(items, path, rank, conv_rank, precision),
                               progress)
            self._wrote_lora(path)
        summary = {"sources": [{"file": str(s), "ratio": i.ratio, "block_weights": i.weights.text() if i.weights
                                else None} for s, i in zip(sources, items)],
                   "architecture": items[0].lora.architecture, "mode": result.mode,
                   "ranks": sorted(set(result.ranks.values())), **result.report.summary()}
        return ToolReport("merge", str(result.path) if result.path else None, summary)

    def resize(self, file: str, rank: int | None = None, dynamic: str | None = None, conv_rank: int | None = None,
               out: str | None = None, precision: str | None = None, overwrite: bool = False,
               progress: ToolProgress | None = None) -> ToolReport:
        """A LoRA at a new rank: fixed, or chosen per module by `sv_ratio:R`, `sv_fro:F` or `sv_cumulative:C`.

        Args:
            file (str): the LoRA.
            rank (int, optional): the new rank, or the cap of a dynamic choice.
            dynamic (str, optional): the dynamic method and value.
            conv_rank (int, optional): rank of kxk convs, defaults to `rank`.
            out (str, optional): the new file; None previews.
            precision (str, optional): "float", "fp16" or "bf16", defaults to the source's.
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: ranks before -> after (counts), retained energy overall and by block.
        """
        from lora_trainer.tools import read_lora
        from lora_trainer.tools.output import precision_dtype
        from lora_trainer.tools.resize import parse_dynamic, resize_lora, resize_state_dict

        source = self.folders.lora_path(file)
        lora = read_lora(source)
        if out is None:
            dtype = precision_dtype(precision) if precision else None
            result = resize_state_dict(lora, rank, parse_dynamic(dynamic) if dynamic else None, conv_rank, dtype)[1]
        else:
            path = self._output(out, [source], False, overwrite)
            result = self._run("LoRA resize", lambda _: resize_lora(lora, path, rank, dynamic, conv_rank,
                                                                     precision), progress)
            self._wrote_lora(path)
        changes: dict[str, int] = {}
        for before, after in result.ranks.values():
            changes[f"{before}->{after}"] = changes.get(f"{before}->{after}", 0) + 1
        summary = {"source": str(source), "architecture": lora.architecture, "rank_changes": changes,
                   **result.report.summary()}
        return ToolReport("resize", str(result.path) if result.path else None, summary)

    def inspect(self, file: str) -> ToolReport:
        """What a LoRA file holds: architecture, algorithm, ranks per module and block, metadata, key check.

        Args:
            file (str): the LoRA.

        Returns:
            ToolReport: `InspectReport.to_dict()` with `keys_ok`.
        """
        from lora_trainer.tools.inspect_lora import inspect_lora

        report = inspect_lora(self.folders.lora_path(file)).to_dict()
        report["by_block"] = {slot: {"modules": b["modules"], "ranks": b["ranks"]}
                              for slot, b in report["by_block"].items()}
        return ToolReport("inspect", None, report)


__all__ = ["CHECKPOINT_SUFFIXES", "LORA_SUFFIXES", "TOOLS", "ToolCancelled", "ToolFolders", "ToolProgress",
           "LoraTools", "ToolReport", "parse_specs", "split_spec"]
