"""Borrowing a host's model for training and giving it back exactly as it was (WebUI-independent parts).

The WebUI host (`a1111.py`) adds what needs the WebUI (its Lora extension, options, job system); everything here
works on plain `nn.Module` trees (ldm `LatentDiffusion`, sgm `DiffusionEngine`) and is tested on the real ldm classes.

Steps: `snapshot_model` remembers every parameter's and buffer's device, dtype and `requires_grad`, every module's
train/eval flag, ldm/sgm checkpoint flags and instance-level `forward` overrides; `refuse_untrainable` refuses
weights training cannot use (fp8 storage, meta tensors) with a message saying what to change; `borrowed_model`
freezes everything and, on any exit, puts it all back and removes leftovers (instance forwards our modules set).
`state_fingerprint` / `compare_with_file` prove the weights are bit-identical to before / to the checkpoint file;
`weight_identities` / `changed_weights` show at no cost that no weight was replaced or written.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

# ldm/sgm block classes carrying their own checkpoint flag, and its attribute name.
CHECKPOINT_FLAGS = {"ResBlock": "use_checkpoint", "BasicTransformerBlock": "checkpoint"}
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


@dataclass
class ModelSnapshot:
    """Everything `borrowed_model` puts back.

    Attributes:
        tensors (list): `(module, attribute name, is_parameter, device, dtype, requires_grad)` per parameter/buffer.
        training (list): `(module, training flag)` per module.
        checkpoint_flags (list): `(module, attribute, value)` for ldm/sgm blocks.
        forwards (set[int]): ids of modules that had an instance-level `forward` before (the WebUI's own hooks).
    """

    tensors: list[tuple[nn.Module, str, bool, torch.device, torch.dtype, bool]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    checkpoint_flags: list[tuple[nn.Module, str, object]] = field(default_factory=list)
    forwards: set[int] = field(default_factory=set)


def snapshot_model(root: nn.Module) -> ModelSnapshot:
    """Remember devices, dtypes, `requires_grad`, train/eval and checkpoint flags of every module under `root`.

    Args:
        root (nn.Module): the host's whole model.

    Returns:
        ModelSnapshot: what `restore_model` puts back.
    """
    snap = ModelSnapshot()
    for module in root.modules():
        snap.training.append((module, module.training))
        if "forward" in module.__dict__:
            snap.forwards.add(id(module))
        flag = CHECKPOINT_FLAGS.get(type(module).__name__)
        if flag is not None and hasattr(module, flag):
            snap.checkpoint_flags.append((module, flag, getattr(module, flag)))
        for name, param in module.named_parameters(recurse=False):
            snap.tensors.append((module, name, True, param.device, param.dtype, param.requires_grad))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                snap.tensors.append((module, name, False, buf.device, buf.dtype, False))
    return snap


def freeze_model(root: nn.Module) -> int:
    """Set `requires_grad=False` on every parameter under `root`.

    Args:
        root (nn.Module): the host's model.

    Returns:
        int: how many parameters were trainable before.
    """
    changed = 0
    for param in root.parameters():
        changed += int(param.requires_grad)
        param.requires_grad_(False)
    return changed


def restore_model(root: nn.Module, snap: ModelSnapshot) -> list[str]:
    """Put back what `snapshot_model` remembered and drop instance-level forwards added since.

    Args:
        root (nn.Module): the model given to `snapshot_model`.
        snap (ModelSnapshot): its snapshot.

    Returns:
        list[str]: what had to be corrected (for the log; empty when the run left everything in place).
    """
    fixed: list[str] = []
    for module, name, is_param, device, dtype, grad in snap.tensors:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        if tensor.device != device or tensor.dtype != dtype:
            fixed.append(f"{type(module).__name__}.{name} -> {device}/{dtype}")
            with torch.no_grad():
                tensor.data = tensor.data.to(device=device, dtype=dtype)
        if is_param and tensor.requires_grad != grad:
            tensor.requires_grad_(grad)
    for module, flag in snap.training:
        module.training = flag
    for module, attr, value in snap.checkpoint_flags:
        setattr(module, attr, value)
    for module in root.modules():
        if "forward" in module.__dict__ and id(module) not in snap.forwards:
            del module.__dict__["forward"]
            fixed.append(f"{type(module).__name__}: leftover forward override removed")
    return fixed


def refuse_untrainable(root: nn.Module, where: str = "the loaded model") -> None:
    """Refuse weights that training cannot run on.

    Args:
        root (nn.Module): the model (its UNet is enough).
        where (str, optional): named in the message, defaults to "the loaded model".

    Raises:
        ModelLoadError: fp8 weight storage or meta tensors.
    """
    for name, param in root.named_parameters():
        if FP8_DTYPES and param.dtype in FP8_DTYPES:
            raise ModelLoadError(
                f"{where}: weight {name} is stored as {param.dtype} (fp8 weight storage). LoRA training needs "
                "fp16/bf16/fp32 weights: set Settings > Optimizations > FP8 weight to Disable, reload the model "
                "and start again."
            )
        if param.is_meta:
            raise ModelLoadError(f"{where}: weight {name} is not loaded (meta tensor). Load the checkpoint fully "
                                 "(no lazy loading) and start again.")


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes): equal means bit-identical.

    Args:
        module (nn.Module): the model.

    Returns:
        str: hex digest.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=False).items():
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
            if data.numel():  # the tensor's own bytes, not a copy of them (a third faster on a full-size model)
                digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def weight_identities(module: nn.Module) -> dict[str, tuple[int, int | None]]:
    """Which tensor object holds each parameter and buffer, and its version counter; free to take, unlike a hash.

    Equal before and after some work means no weight was replaced (a merge not put back) and none was written in
    place by a torch op (each write bumps the counter). Inference tensors (Forge) carry no counter: None.

    Args:
        module (nn.Module): the model.

    Returns:
        dict[str, tuple[int, int | None]]: `{name: (id, version)}`.
    """
    found = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor
            version = None
        found[name] = (id(tensor), version)
    return found


def changed_weights(before: dict, after: dict, writes_expected: bool = False) -> list[str]:
    """Names whose tensor was replaced (or added, or removed) between two `weight_identities`, or written in place.

    Args:
        before (dict): `weight_identities` before.
        after (dict): `weight_identities` after.
        writes_expected (bool, optional): in-place writes are expected (the host copied its backups back into
            weights it had merged a prompt LoRA into), so only replacements count, defaults to False.

    Returns:
        list[str]: the changed names, sorted.
    """
    changed = set(before).symmetric_difference(after)
    for name in set(before) & set(after):
        (id_before, version_before), (id_after, version_after) = before[name], after[name]
        if id_before != id_after or (not writes_expected and version_before != version_after):
            changed.add(name)
    return sorted(changed)


def compare_with_file(module: nn.Module, checkpoint: str | Path, prefix: str, names: list[str] | None = None,
                      limit: int | None = None) -> list[str]:
    """Compare weights of `module` with the checkpoint file's tensors under `prefix`, in the module's dtype.

    Args:
        module (nn.Module): e.g. the UNet (`model.diffusion_model`).
        checkpoint (str | Path): the `.safetensors` file the host loaded.
        prefix (str): the file's key prefix for `module` (e.g. "model.diffusion_model.").
        names (list[str], optional): only these parameter names (e.g. the ones a LoRA was merged into), defaults to
            all; `limit` evenly spaced others are added when given.
        limit (int, optional): at most this many extra evenly spaced names besides `names`, defaults to all.

    Returns:
        list[str]: parameter names that differ from the file (empty = equal).

    Raises:
        ModelLoadError: the file is not a safetensors file or lacks the keys.
    """
    from safetensors import safe_open

    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: only .safetensors checkpoints can be compared lazily. Convert the checkpoint "
                             "to .safetensors or skip the weight check.")
    params = dict(module.named_parameters())
    chosen = list(names) if names is not None else []
    others = [n for n in params if n not in set(chosen)]
    if limit is not None and len(others) > limit:
        step = len(others) / max(1, limit)
        others = [others[int(i * step)] for i in range(limit)]
    differ = []
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for name in dict.fromkeys(chosen + others):
            key = prefix + name
            if key not in keys:
                raise ModelLoadError(f"{path}: has no tensor {key}. The loaded model does not come from this file; "
                                     "reload the checkpoint in the WebUI.")
            own = params[name].detach()
            stored = handle.get_tensor(key).to(dtype=own.dtype)
            if stored.shape != own.shape or not torch.equal(stored, own.cpu()):
                differ.append(name)
    return differ


@contextlib.contextmanager
def borrowed_model(root: nn.Module, adapter=None, where: str = "the loaded model"):
    """Freeze the host's model for a run and leave it exactly as found on success, stop or error.

    Args:
        root (nn.Module): the host's whole model.
        adapter (optional): its adapter; `restore_checkpoint_flags()` is called on exit when it has one.
        where (str, optional): named in messages, defaults to "the loaded model".

    Yields:
        ModelSnapshot: the remembered state.
    """
    refuse_untrainable(root, where)
    snap = snapshot_model(root)
    trainable = freeze_model(root)
    logger.info("handshake: froze %s (%d parameters were trainable)", where, trainable)
    try:
        yield snap
    finally:
        if adapter is not None and hasattr(adapter, "restore_checkpoint_flags"):
            adapter.restore_checkpoint_flags()
        fixed = restore_model(root, snap)
        if fixed:
            logger.info("handshake: put back %d things the run left changed: %s", len(fixed), "; ".join(fixed[:5]))
        logger.info("handshake: %s restored (devices, dtypes, requires_grad, train/eval, checkpoint flags)", where)


@dataclass
class OrdinaryReport:
    """What `make_ordinary` did.

    Attributes:
        converted (int): tensors that were inference tensors and now are ordinary ones.
        bytes (int): their size in bytes.
        peak_extra_bytes (int): the largest single tensor copied (the most memory the conversion held twice at once).
    """

    converted: int = 0
    bytes: int = 0
    peak_extra_bytes: int = 0


def make_ordinary(roots: list[nn.Module], release=None, release_every: int = 256 * 2**20) -> OrdinaryReport:
    """Turn every inference tensor (made under `torch.inference_mode`) under `roots` into an ordinary tensor in place.

    Autograd cannot save an inference tensor for backward, so frozen weights a LoRA's gradient flows through must be
    ordinary. Each tensor is copied and swapped in on its own (Parameters stay Parameters, with the same
    `requires_grad`), so at most one tensor exists twice at a time; the values are bit-identical.

    Args:
        roots (list[nn.Module]): the modules to convert (a tree may be shared between roots).
        release (callable, optional): called after every `release_every` bytes converted, to hand the freed
            originals back to the system (the host passes `malloc_trim`), defaults to None.
        release_every (int, optional): bytes between `release` calls, defaults to 256 MiB.

    Returns:
        OrdinaryReport: counts and the peak extra memory.
    """
    report = OrdinaryReport()
    since_release = 0
    seen: set[int] = set()
    with torch.inference_mode(False), torch.no_grad():
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for store in (module._parameters, module._buffers):
                    for name in list(store):  # names only: a list of the tensors would keep every original alive
                        tensor = store[name]
                        if tensor is None or not tensor.is_inference():
                            continue
                        copy = tensor.clone()
                        if isinstance(tensor, nn.Parameter):
                            copy = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                        store[name] = copy
                        size = tensor.numel() * tensor.element_size()
                        report.converted += 1
                        report.bytes += size
                        report.peak_extra_bytes = max(report.peak_extra_bytes, size)
                        del tensor, copy
                        since_release += size
                        if release is not None and since_release >= release_every:
                            release()
                            since_release = 0
    return report
