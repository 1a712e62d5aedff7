"""Resume state: everything a run needs to continue exactly where it stopped.

A state folder (`<output_name>-state/`, `<output_name>-000002-state/`, `<output_name>-step00000100-state/`) holds:
`network.safetensors` (trainable weights), `optimizer.pt`, `scheduler.pt` and `scaler.pt` (loaded with
`weights_only=True`), `rng.pt` (torch, CUDA, python and numpy RNG states and the loop's own generators) and
`train_state.json` (step, epoch, position in the epoch, config hash), and with `ema` on `ema.safetensors`. Its
files are written and fsynced in a temporary folder that is then renamed into place, so a crash never leaves a
half-written state behind.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from lora_trainer.atomic_io import atomic_write_bytes, fsync_dirs
from lora_trainer.errors import TrainingError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
_FILES = ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "train_state.json")


@dataclass(frozen=True)
class TrainState:
    """Where a run stands.

    Attributes:
        global_step (int): optimizer steps done.
        epoch (int): 0-based epoch the next step belongs to.
        step_in_epoch (int): optimizer steps already done inside `epoch`.
        config_hash (str): `config_hash()` of the run that wrote the state.
        losses (list[float]): the per-step losses so far (for the average shown and the result).
        seed (int, optional): the run's seed (data order and noise follow it).
        steps_per_epoch (int): optimizer steps in one epoch of the run that saved it (0: not recorded), so a run
            with another process count or batch size can place `step_in_epoch` in its own epoch.
        processes (int): data-parallel processes of the run that saved it.
    """

    global_step: int
    epoch: int
    step_in_epoch: int
    config_hash: str = ""
    losses: list[float] = field(default_factory=list)
    seed: int | None = None
    steps_per_epoch: int = 0
    processes: int = 1


@dataclass
class LoadedState:
    """A state folder read back; the loop puts each part where it belongs."""

    train_state: TrainState
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def config_hash(config: Any) -> str:
    """A short hash of the parts of a config that change what a step computes (not save/log/stop settings).

    Args:
        config (TrainConfig): the run's config.

    Returns:
        str: 16 hex digits.
    """
    parts = {}
    for name in ("model", "network", "optimizer", "dataset", "training"):
        section = getattr(config, name, None)
        if section is not None and dataclasses.is_dataclass(section):
            values = dataclasses.asdict(section)
            for volatile in ("max_train_steps", "max_train_epochs"):
                values.pop(volatile, None)
            parts[name] = values
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state a step may draw from.

    Args:
        generators (dict[str, torch.Generator]): the loop's named generators (noise, timesteps).

    Returns:
        dict: states in types `torch.load(weights_only=True)` accepts.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put RNG states from `capture_rng` back (generators by name; unknown names are ignored).

    Args:
        state (dict): from `capture_rng` / `LoadedState.rng`.
        generators (dict[str, torch.Generator]): the loop's generators, set in place.
    """
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    path: str | Path,
    train_state: TrainState,
    network: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: dict[str, Any],
    scaler: Any = None,
    ema: Any = None,
) -> Path:
    """Write a state folder atomically (temp folder in the same parent, then rename).

    Args:
        path (str | Path): the state folder to (re)create.
        train_state (TrainState): position of the run.
        network (dict[str, torch.Tensor]): trainable weights (saved as float32 unless already exact).
        optimizer (torch.optim.Optimizer): its state dict is saved.
        scheduler: lr scheduler; its state dict is saved.
        rng (dict): from `capture_rng`.
        scaler (torch.amp.GradScaler, optional): fp16 loss scaler.
        ema (LoraEma, optional): the EMA of the weights (`ema = true`).

    Returns:
        Path: the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        files = {
            "network.safetensors": save_bytes({k: v.detach().contiguous().cpu() for k, v in network.items()}),
            "optimizer.pt": _torch_bytes(optimizer.state_dict()),
            "scheduler.pt": _torch_bytes(scheduler.state_dict()),
            "rng.pt": _torch_bytes(rng),
            "train_state.json": json.dumps({**dataclasses.asdict(train_state), "format": STATE_FORMAT}).encode(),
        }
        if scaler is not None:
            files["scaler.pt"] = _torch_bytes(scaler.state_dict())
        if ema is not None:
            files["ema.safetensors"] = save_bytes(ema.state_dict())
        synced: set = set()
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data, dirs_to_sync=synced)
        fsync_dirs(synced)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        fsync_dirs([path.parent])
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved resume state %s (step %d)", path, train_state.global_step)
    return path


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or foreign pickle
        raise TrainingError(
            f"{path}: cannot be read as resume state ({exc}). Point resume at a folder written by save_state, "
            "or start without resume."
        ) from exc


def check_state_folder(path: str | Path) -> TrainState:
    """Check a resume folder without loading its tensors: every file present and readable, `train_state.json`
    valid. Cheap enough to run before the model loads.

    Args:
        path (str | Path): the state folder (the `resume` key).

    Returns:
        TrainState: where the saved run stands.

    Raises:
        TrainingError: a file is missing, unreadable or corrupt (named, with the fix).
    """
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise TrainingError(
            f"resume: {path} is not a resume state folder (missing {', '.join(missing) or 'the folder'}). "
            "Point resume at a '<output_name>-state' folder written with save_state = true."
        )
    for name in _FILES:
        try:
            with open(path / name, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise TrainingError(f"resume: {path / name} cannot be read ({exc.strerror}). Fix its permissions, "
                                "or start without resume.") from exc
    return _read_train_state(path / "train_state.json")


def _read_train_state(file: Path) -> TrainState:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"holds a {type(raw).__name__}, not an object")
        raw.pop("format", None)
        known = {f.name for f in dataclasses.fields(TrainState)}
        return TrainState(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TrainingError(
            f"resume: {file} is corrupt ({str(exc)[:200]}). Resume from another saved state (an earlier "
            "'-state' folder), or start without resume."
        ) from exc


def _load_network(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error type, or OSError
        raise TrainingError(f"resume: {file} is not a valid safetensors file ({str(exc)[:200]}). Resume from "
                            "another saved state, or start without resume.") from exc


def load_state(path: str | Path) -> LoadedState:
    """Read a state folder written by `save_state`.

    Args:
        path (str | Path): the state folder (the `resume` key).

    Returns:
        LoadedState: the parts, still on the CPU.

    Raises:
        TrainingError: a file is missing or corrupt (named, with the fix).
    """
    path = Path(path)
    train_state = check_state_folder(path)
    scaler_path, ema_file = path / "scaler.pt", path / "ema.safetensors"
    return LoadedState(
        train_state=train_state,
        network=_load_network(path / "network.safetensors"),
        optimizer=_load_pt(path / "optimizer.pt"),
        scheduler=_load_pt(path / "scheduler.pt"),
        scaler=_load_pt(scaler_path) if scaler_path.is_file() else None,
        rng=_load_pt(path / "rng.pt"),
        ema=_load_network(ema_file) if ema_file.is_file() else None,
    )


def state_leftovers(folder: str | Path, output_name: str = "") -> tuple[list[Path], list[Path]]:
    """What a `save_state` killed mid-way leaves in `folder`.

    Args:
        folder (str | Path): the output folder.
        output_name (str, optional): only the states of this name (and its epoch/step saves), defaults to all.

    Returns:
        tuple[list[Path], list[Path]]: (half-written temp folders, safe to delete; `.<name>-state.old` folders
        whose `<name>-state` is missing: the last complete state, to be renamed back).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    prefix = f".{glob.escape(output_name)}*-state."
    partial, orphans = [], []
    for entry in sorted(folder.glob(prefix + "*")):
        if not entry.is_dir():
            continue
        if entry.name.endswith(".old"):
            target = entry.with_name(entry.name[1:-len(".old")])
            (partial if target.exists() else orphans).append(entry)
        else:
            partial.append(entry)
    return partial, orphans
