"""Checks that run before training, so that a run never fails after hours for something knowable at the start.

`check_before_model(config, device)` needs no model and runs before the checkpoint loads (seconds): device,
input files (checkpoint, VAE, network_weights, resume state), output folder and name (a probe file with the
longest name a run writes), leftovers of a killed run, the dataset scan and the step plan, then the checkpoint's
header and its same-named `.yaml` (architecture, a malformed or contradicting yaml; no tensor is read). Once the
model is loaded, `resources.check_resources` weighs the network against free memory and the saves against free disk.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.atomic_io import TEMP_SUFFIX, temp_files
from lora_trainer.errors import ConfigError, ModelLoadError, NetworkError

logger = logging.getLogger(__name__)

# The longest name a run writes beside `<output_name>`: a step save's EMA file's temp file (atomic_io).
LONGEST_SUFFIX = "-step00000000-ema.safetensors.00000000" + TEMP_SUFFIX
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
WINDOWS_FORBIDDEN = '<>:"|?*'


@dataclass
class Preflight:
    """What the checks before the model found.

    Attributes:
        output_dir (Path): the output folder (exists, writable).
        index (DatasetIndex): the scanned dataset (training reuses it).
        plan (StepPlan): steps and epochs of the run.
        plan_note (str): how the step count was chosen (which of max_train_epochs / max_train_steps wins).
        cleaned (list[str]): leftovers of a killed run that were removed or restored.
        architecture (str, optional): the checkpoint's architecture from its header and yaml (None: not checked,
            or a pickle checkpoint).
    """

    output_dir: Path
    index: object
    plan: object
    plan_note: str
    cleaned: list[str] = field(default_factory=list)
    architecture: str | None = None


def check_before_model(config, device: str | None = None, loads_checkpoint: bool = False,
                       processes: int = 1) -> Preflight:
    """Everything that can be checked before the model loads; raises at the first problem, naming key and fix.

    Args:
        config (TrainConfig): the run's config.
        device (str, optional): the device training will use ("cuda", "cuda:1", "cpu"), None when the host
            decides (the WebUI), defaults to None.
        loads_checkpoint (bool, optional): the model will be loaded from `pretrained_model_name_or_path` (and
            `vae`), so those files are checked; False where the host trains its own loaded model, defaults to False.
        processes (int, optional): data-parallel processes training together (each takes train_batch_size
            images of every step, so an epoch has fewer steps), defaults to 1.

    Returns:
        Preflight: the output folder, dataset index and step plan.
    """
    check_device(device)
    m, n, s = config.model, config.network, config.save
    if loads_checkpoint and m.pretrained_model_name_or_path:
        check_readable("pretrained_model_name_or_path", m.pretrained_model_name_or_path)
    if loads_checkpoint and m.vae:
        check_readable("vae", m.vae)
    elif m.vae:
        logger.warning("vae: not used here: the host trains with its own loaded model and VAE (%s)", m.vae)
    if n.network_weights:
        check_safetensors("network_weights", n.network_weights)
    folder = check_output(config)
    from lora_trainer.data.folders import scan_dataset

    index = scan_dataset(config.dataset)  # all of the above runs before torch is imported (a fraction of a second)
    cleaned = clean_leftovers(folder, s.output_name)
    if s.resume:
        from lora_trainer.train.state import check_state_folder

        check_state_folder(s.resume)
        cleaned += clean_leftovers(Path(s.resume).parent, Path(s.resume).name.removesuffix("-state"))
    plan, note = _plan(config, index, processes)
    logger.info("%s", note)
    architecture = None
    if loads_checkpoint and m.pretrained_model_name_or_path:  # last: the only check that imports torch
        from lora_trainer.models.checkpoint_list import inspect_checkpoint

        path = Path(m.pretrained_model_name_or_path).expanduser()
        architecture = inspect_checkpoint(path, bool(m.v_parameterization))
        logger.info("%s: %s checkpoint", path.name, architecture or "a pickle")
    return Preflight(folder, index, plan, note, cleaned, architecture)


def _plan(config, index, processes: int = 1):
    from lora_trainer.data.loader import TrainDataset
    from lora_trainer.train.preparation import plan_steps, refuse_unreadable_captions

    refuse_unreadable_captions(index)
    dataset = TrainDataset(index, config.dataset)
    dataset.processes = processes
    t = config.training
    plan = plan_steps(dataset.batches_per_epoch(), config.optimizer.gradient_accumulation_steps, t.max_train_steps,
                      t.max_train_epochs)
    note = describe_plan(plan, t.max_train_steps, t.max_train_epochs)
    if processes > 1:
        note += (f"; {processes} processes x train_batch_size {config.dataset.train_batch_size} = "
                 f"{processes * config.dataset.train_batch_size} images per batch")
    return plan, note


def describe_plan(plan, max_train_steps: int | None, max_train_epochs: int | None) -> str:
    """One line saying how long the run is and which key decided it (kohya: max_train_epochs wins when set).

    Args:
        plan (StepPlan): from `plan_steps`.
        max_train_steps (int, optional): the config's value.
        max_train_epochs (int, optional): the config's value.

    Returns:
        str: e.g. "225 steps (max_train_epochs = 3 wins over max_train_steps = 6: 75 steps per epoch x 3 epochs)".
    """
    per_epoch = f"{plan.steps_per_epoch} steps per epoch x {plan.total_epochs} epochs"
    if max_train_epochs:
        why = (f"max_train_epochs = {max_train_epochs} wins over max_train_steps = {max_train_steps}"
               if max_train_steps else f"max_train_epochs = {max_train_epochs}")
    else:
        why = f"max_train_steps = {max_train_steps}"
    return f"training plan: {plan.total_steps} steps ({why}: {per_epoch})"


def check_for_host(config, host) -> Preflight:
    """`check_before_model` for a host: the device a standalone host was asked for, and the checkpoint files of a
    host that loads them (`loads_checkpoint`), are checked too.

    Args:
        config (TrainConfig): the run's config (with output_dir set).
        host (Host): the host.

    Returns:
        Preflight: the result.
    """
    return check_before_model(config, getattr(host, "requested_device", None),
                              loads_checkpoint=bool(getattr(host, "loads_checkpoint", False)))


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use.

    Args:
        device (str, optional): "cpu", "cuda", "cuda:N", "mps"; None passes.
    """
    if not device or device == "cpu":
        return
    import torch

    kind, _, number = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {device}: {why}. Use --device cpu, or install a CUDA build of torch "
                              "(https://pytorch.org/get-started/locally/).")
        if number and (not number.isdigit() or int(number) >= torch.cuda.device_count()):
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s). "
                              "Use cuda:0 .. cuda:N-1.")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available here. Use --device cpu.")
    else:
        raise ConfigError(f"--device {device}: unknown device. Use cpu, cuda or cuda:N.")


def check_readable(key: str, path: str | os.PathLike) -> Path:
    """A file the run will read: it exists, is a file, and can be opened.

    Args:
        key (str): the config key, for the message.
        path (str | PathLike): the file.

    Returns:
        Path: the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} not found. Check the path.")
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder. Give the file itself.")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError as exc:
        raise ModelLoadError(f"{key}: {path}: permission denied. Make the file readable (chmod a+r) or copy it "
                             "somewhere you may read.") from exc
    except OSError as exc:
        raise ModelLoadError(f"{key}: {path} cannot be read ({exc.strerror}). Check the disk and the file.") from exc
    return path


def check_safetensors(key: str, path: str | os.PathLike) -> Path:
    """A readable `.safetensors` file whose header parses (its tensors are not read).

    Args:
        key (str): the config key, for the message.
        path (str | PathLike): the file.

    Returns:
        Path: the file.
    """
    from safetensors import safe_open

    path = check_readable(key, path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise NetworkError(f"{key}: {path} is not a valid safetensors file ({str(exc)[:200]}). Point it at a "
                           "LoRA .safetensors file, or re-save the file.") from exc
    return path


def check_output_name(name: str) -> None:
    """Refuse an `output_name` that cannot be a file name (separators, NUL, `.`/`..`, Windows reserved names).

    Args:
        name (str): `output_name`.
    """
    if not name or name.strip() in (".", ".."):
        raise ConfigError(f"output_name: {name!r} is not a file name. Use letters, digits, '-' or '_'.")
    bad = [c for c in ("\0", "/", os.sep, os.altsep or "") if c and c in name]
    if os.name == "nt":
        bad += [c for c in WINDOWS_FORBIDDEN if c in name]
        if name.split(".")[0].strip().lower() in WINDOWS_RESERVED:
            raise ConfigError(f"output_name: {name!r} is a reserved device name on Windows. Choose another name.")
    if bad:
        raise ConfigError(f"output_name: {name!r} holds {', '.join(repr(c) for c in sorted(set(bad)))}, which a "
                          "file name cannot. Use letters, digits, '-' or '_' (put folders in output_dir).")


def check_output(config) -> Path:
    """Create the output folder and prove a run can write its longest file name there (probe file created and
    deleted).

    Args:
        config (TrainConfig): the run's config.

    Returns:
        Path: the output folder.
    """
    save = config.save
    if not save.output_dir:
        raise ConfigError("output_dir: not set. Set output_dir to the folder where LoRA files should go.")
    check_output_name(save.output_name)
    folder = Path(save.output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir: {folder} is a file, not a folder. Choose a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as exc:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), "a parent")
        raise ConfigError(f"output_dir: {folder} cannot be created: {blocker} is a regular file, not a folder. "
                          "Choose a path below a folder.") from exc
    except OSError as exc:
        raise ConfigError(f"output_dir: {folder} cannot be created ({exc.strerror}). Choose a folder you may "
                          "write to.") from exc
    _probe(folder, save.output_name)
    return folder


def _probe(folder: Path, name: str) -> None:
    probe = folder / f".{name}{LONGEST_SUFFIX}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        import errno

        if exc.errno == errno.ENAMETOOLONG:
            room = len(os.fsencode(probe.name)) - len(os.fsencode(name))
            raise ConfigError(f"output_name: {len(name)} characters is too long for {folder} (saves add up to "
                              f"{room} characters, e.g. '-step00000100-state'). Use a shorter output_name.") from exc
        raise ConfigError(f"output_dir: {folder} is not writable ({exc.strerror}). Choose a folder you may "
                          "write to, or fix its permissions.") from exc


def clean_leftovers(folder: Path, output_name: str) -> list[str]:
    """Remove what a killed run left beside its saves: temp files of interrupted writes and half-written state
    folders; a complete state left only as `.<name>-state.old` (killed between two renames) is renamed back.

    Args:
        folder (Path): the output folder.
        output_name (str): the run's name (only its own leftovers are touched).

    Returns:
        list[str]: one line per file or folder removed or restored (also logged).
    """
    from lora_trainer.train.state import state_leftovers

    done = []
    partial, orphans = state_leftovers(folder, output_name)
    for path in temp_files(folder, output_name) + partial:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            done.append(f"removed {path} (left by an interrupted save)")
        except OSError as exc:
            logger.warning("%s: left by an interrupted save and cannot be removed (%s); delete it by hand", path,
                           exc.strerror)
    for old in orphans:
        target = old.with_name(old.name[1:-len(".old")])
        old.rename(target)
        done.append(f"restored {target} from {old.name} (a save was interrupted while replacing it)")
    for line in done:
        logger.warning("%s", line)
    return done
