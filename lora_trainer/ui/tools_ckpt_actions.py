"""The checkpoint jobs of the Tools panel and the tools API: bake LoRAs into a checkpoint, extract a LoRA from
two checkpoints, merge and prune checkpoints. `Tools` is the whole set (these plus `LoraTools`). No gradio here.

Previews read only the files' headers (architecture, tensors, targets, the merge weight per block, what pruning
keeps) and never a tensor, so they answer at once even for SDXL checkpoints. The jobs stream tensor by tensor
from the files: the model the host has loaded is neither read, reloaded nor unloaded.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from lora_trainer.ui.tools_actions import LoraTools, ToolProgress, ToolReport


def _header(path: Path) -> dict:
    """Family, tensor count and size of a checkpoint, from its header."""
    from lora_trainer.tools.ckpt_keys import checkpoint_family
    from lora_trainer.tools.tensor_stream import TensorReader

    with TensorReader(path) as reader:
        return {"file": str(path), "family": checkpoint_family(reader.infos, str(path)),
                "tensors": len(reader.infos), "bytes": path.stat().st_size}


def _mean_by_block(shares: dict[str, float]) -> dict[str, float]:
    """The mean of per-module shares in each block slot."""
    from lora_trainer.tools.blocks import group_by_slot

    return {slot: sum(shares[n] for n in names) / len(names) for slot, names in group_by_slot(shares).items()}


def _dtype_size(dtype, precision: str | None) -> int:
    from lora_trainer.tools.tensor_stream import output_dtype

    return output_dtype(dtype, precision).itemsize


class Tools(LoraTools):
    """Every tool on one host's folders: the LoRA file tools and the checkpoint tools.

    Args:
        host (Host): gives the folders, the job system and `refresh_loras`.
        folder_policy (PolicySource, optional): the host's folder rule (see `LoraTools`).
    """

    def bake(self, checkpoint: str, loras: list[tuple[str, float, str | None]], out: str | None = None,
             precision: str | None = None, overwrite: bool = False,
             progress: ToolProgress | None = None) -> ToolReport:
        """LoRAs baked into a new checkpoint (in the Stable-diffusion folder).

        Args:
            checkpoint (str): the checkpoint (a name in the Stable-diffusion folder or a path).
            loras (list[tuple[str, float, str | None]]): (LoRA, ratio, block weights: preset or vector, or None).
            out (str, optional): the new checkpoint; None previews.
            precision (str, optional): "fp16", "bf16" or "fp32", defaults to the checkpoint's.
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: the checkpoint's family; per LoRA its architecture, modules, ranks, ratio and block weights;
            after writing, modules baked and weights changed.
        """
        from lora_trainer.tools.bake import LoraToBake, bake_loras
        from lora_trainer.tools.inspect_lora import inspect_lora, rank_summary
        from lora_trainer.tools.presets import resolve_weights

        if not loras:
            raise ValueError("bake: no LoRA files given. Add at least one file with its ratio.")
        source = self.folders.checkpoint_path(checkpoint)
        summary = {"checkpoint": _header(source), "loras": []}
        specs, book = [], self.presets()
        for name, ratio, weights in loras:
            path = self.folders.lora_path(name, "loras")
            report = inspect_lora(path)
            vector = resolve_weights(weights, report.architecture, book) if weights else None
            specs.append(LoraToBake(path, ratio, tuple(vector.given) if vector else None))
            summary["loras"].append({"file": str(path), "architecture": report.architecture, "ratio": ratio,
                                     "modules": report.modules, "ranks": rank_summary(report),
                                     "block_weights": vector.weights if vector else None})
        if out is None:
            return ToolReport("bake", None, summary)
        target = self._output(out, [source] + [s.path for s in specs], True, overwrite)
        result = self._run("Bake LoRA into checkpoint", lambda step: bake_loras(
            source, specs, target, precision=precision, overwrite=overwrite, progress=step), progress)
        summary.update(modules_baked=result.modules, weights_changed=result.weights_changed,
                       seconds=round(result.seconds, 3))
        return ToolReport("bake", str(result.path), summary)

    def extract(self, tuned: str, base: str, out: str | None = None, dim: int = 4, conv_dim: int | None = None,
                clamp_quantile: float = 0.99, min_diff: float = 0.01, precision: str = "fp16",
                overwrite: bool = False, progress: ToolProgress | None = None) -> ToolReport:
        """A LoRA extracted from the difference of two checkpoints (written to the Lora folder).

        Args:
            tuned (str): the fine-tuned checkpoint.
            base (str): the checkpoint it was tuned from.
            out (str, optional): the new LoRA; None previews.
            dim (int, optional): rank of linear / 1x1 layers, defaults to 4.
            conv_dim (int, optional): rank of kxk convs (adds them), defaults to None.
            clamp_quantile (float, optional): clamp of the factors, defaults to 0.99.
            min_diff (float, optional): text encoders differing by at most this are left out, defaults to 0.01.
            precision (str, optional): "fp16", "bf16" or "fp32", defaults to "fp16".
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: both checkpoints' headers, the LoRA targets by component and the ranks; after writing,
            modules written, text encoders left out, the energy of the difference the rank keeps (smallest per
            module, mean per block).
        """
        from lora_trainer.tools.ckpt_keys import lora_targets
        from lora_trainer.tools.extract import extract_lora
        from lora_trainer.tools.tensor_stream import TensorReader

        folders = self.folders
        tuned_path, base_path = folders.checkpoint_path(tuned, "tuned"), folders.checkpoint_path(base, "base")
        summary = {"tuned": _header(tuned_path), "base": _header(base_path), "dim": dim, "conv_dim": conv_dim}
        with TensorReader(tuned_path) as reader:
            targets = lora_targets(reader.infos, summary["tuned"]["family"]).values()
            summary["targets"] = dict(Counter(f"{t.component} {t.kind}" for t in targets))
        if out is None:
            return ToolReport("extract", None, summary)
        target = self._output(out, [tuned_path, base_path], False, overwrite)
        result = self._run("Extract LoRA", lambda step: extract_lora(
            tuned_path, base_path, target, dim=dim, conv_dim=conv_dim, clamp_quantile=clamp_quantile,
            min_diff=min_diff, precision=precision, overwrite=overwrite, progress=step), progress)
        self._wrote_lora(result.path)
        summary.update(modules=result.modules, skipped_text_encoders=result.skipped_text_encoders,
                       identical_modules=len(result.identical_modules), seconds=round(result.seconds, 3),
                       retained_min=result.min_retained, retained_by_block=_mean_by_block(result.retained_energy))
        return ToolReport("extract", str(result.path), summary)

    def ckpt_merge(self, a: str, b: str, out: str | None = None, c: str | None = None, mode: str = "sum",
                   alpha: float = 0.5, block_alpha: list[float] | None = None, precision: str | None = None,
                   overwrite: bool = False, progress: ToolProgress | None = None) -> ToolReport:
        """Two checkpoints merged (`A*(1-M)+B*M`) or a difference added (`A+(B-C)*M`), M per block or one value.

        Args:
            a, b (str): models A and B.
            out (str, optional): the new checkpoint; None previews.
            c (str, optional): model C for mode "add-diff".
            mode (str, optional): "sum" or "add-diff", defaults to "sum".
            alpha (float, optional): M for every key without `block_alpha`, defaults to 0.5.
            block_alpha (list[float], optional): one M per block (26 SD1/SD2, 20 SDXL).
            precision (str, optional): "fp16", "bf16" or "fp32", defaults to A's dtypes.
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): progress and Cancel.

        Returns:
            ToolReport: the inputs' headers, the mode and M per block; after writing, keys merged and copied.
        """
        from lora_trainer.tools.ckpt_merge import block_alphas, merge_checkpoints, merge_slots

        if mode not in ("sum", "add-diff"):
            raise ValueError(f"mode: {mode!r} is unknown. Use \"sum\" or \"add-diff\".")
        if mode == "add-diff" and not (c or "").strip():
            raise ValueError("c: add difference needs model C (the model B was tuned from). Pick it.")
        paths = {"a": self.folders.checkpoint_path(a, "a"), "b": self.folders.checkpoint_path(b, "b")}
        if mode == "add-diff":
            paths["c"] = self.folders.checkpoint_path(c, "c")
        summary = {key: _header(path) for key, path in paths.items()}
        family = summary["a"]["family"]
        m_by_block = block_alphas(block_alpha, family) if block_alpha else dict.fromkeys(merge_slots(family), alpha)
        summary.update(mode=mode, m_by_block=m_by_block)
        if out is None:
            return ToolReport("ckpt-merge", None, summary)
        target = self._output(out, list(paths.values()), True, overwrite)
        result = self._run("Checkpoint merge", lambda step: merge_checkpoints(
            paths["a"], paths["b"], target, c=paths.get("c"), mode=mode, alpha=alpha, block_alpha=block_alpha,
            precision=precision, overwrite=overwrite, progress=step), progress)
        summary.update(merged=result.merged, copied_from_a=len(result.copied_from_a),
                       copied_from_b=len(result.copied_from_b), left_out=len(result.left_out),
                       seconds=round(result.seconds, 3))
        return ToolReport("ckpt-merge", str(result.path), summary)

    def prune(self, checkpoint: str, out: str | None = None, precision: str | None = None, overwrite: bool = False,
              progress: ToolProgress | None = None) -> ToolReport:
        """A pruned copy of a checkpoint (EMA and keys outside UNet / VAE / text encoders dropped), fp16 if asked.

        Args:
            checkpoint (str): the checkpoint.
            out (str, optional): the new checkpoint; None previews.
            precision (str, optional): "fp16", "bf16" or "fp32", defaults to keeping dtypes.
            overwrite (bool, optional): replace an existing output, defaults to False.
            progress (ToolProgress, optional): Cancel before writing starts (prune reports no steps).

        Returns:
            ToolReport: keys kept and dropped, the dropped key prefixes, the input size and the expected output
            size; after writing, the real sizes.
        """
        from lora_trainer.tools.prune import keep_key, prune_checkpoint
        from lora_trainer.tools.tensor_stream import TensorReader

        source = self.folders.checkpoint_path(checkpoint)
        summary = {"checkpoint": _header(source)}
        with TensorReader(source) as reader:
            kept = [info for key, info in reader.infos.items() if keep_key(key)]
            dropped = [key for key in reader.infos if not keep_key(key)]
        size = sum(math.prod(info.shape) * _dtype_size(info.dtype, precision) for info in kept)
        summary.update(kept=len(kept), dropped=len(dropped), expected_bytes=size,
                       dropped_prefixes=dict(Counter(key.split(".")[0] for key in dropped)))
        if out is None:
            return ToolReport("prune", None, summary)
        target = self._output(out, [source], True, overwrite)
        result = self._run("Prune checkpoint", lambda step: prune_checkpoint(
            source, target, precision=precision, overwrite=overwrite), progress)
        summary.update(kept=result.kept, dropped=len(result.dropped), bytes_out=result.size_out,
                       seconds=round(result.seconds, 3))
        return ToolReport("prune", str(result.path), summary)


__all__ = ["Tools"]
