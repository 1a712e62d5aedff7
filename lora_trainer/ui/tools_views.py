"""How the Tools panel shows a job's report (`ToolReport.to_dict()`): Markdown with the block table, ranks and
retained energy of a preview, or what was written. No gradio here."""
from __future__ import annotations

from typing import Any

from lora_trainer.ui.tools_actions import ToolProgress

TITLES = {"lbw": "Block weights", "merge": "Merge", "resize": "Resize", "bake": "Bake",
          "extract": "Extract", "ckpt-merge": "Checkpoint merge", "prune": "Prune", "inspect": "Inspect"}


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(size: int | float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _energy(r: dict) -> list[str]:
    """Retained energy overall and per block, and the worst module."""
    lines = [f"Retained Frobenius norm: **{r['retained_overall']:.4f}**; largest relative error "
             f"{r['largest_relative_error']:.2e}" + (f" ({r['largest_error_module']})" if r["largest_error_module"]
                                                      else "")]
    lines.append(_table(("Block", "Retained"), [(slot, f"{share:.4f}") for slot, share in
                                               r["retained_by_block"].items()]))
    return lines


def _lbw(r: dict) -> list[str]:
    lines = [f"{r['architecture']} LoRA `{r['source']}`, vector `{r['vector']}`",
             _table(("Block", "Modules", "Weight"), [(slot, b["modules"], f"{b['weight']:g}")
                                                     for slot, b in r["blocks"].items()])]
    if r["dropped_modules"]:
        lines.append(f"{r['dropped_modules']} modules weighted 0 are left out.")
    if r["zero_filled_blocks_used"]:
        lines.append(f"Blocks {', '.join(r['zero_filled_blocks_used'])} are not in the {len(r['vector'].split(','))}"
                     "-value layout and get weight 0, as LoRA Block Weight does.")
    return lines


def _merge(r: dict) -> list[str]:
    sources = [(s["file"], f"{s['ratio']:g}", s["block_weights"] or "") for s in r["sources"]]
    return [f"{r['mode']} merge of {len(sources)} {r['architecture']} LoRAs, {r['modules']} modules, ranks "
            f"{', '.join(map(str, r['ranks']))}", _table(("File", "Ratio", "Block weights"), sources), *_energy(r)]


def _resize(r: dict) -> list[str]:
    changes = ", ".join(f"{change} (x{count})" for change, count in r["rank_changes"].items())
    return [f"{r['architecture']} LoRA `{r['source']}`: ranks {changes}", *_energy(r)]


def _bake(r: dict) -> list[str]:
    ckpt = r["checkpoint"]
    rows = [(lo["file"], lo["architecture"], f"{lo['ratio']:g}", lo["modules"], lo["ranks"],
             "yes" if lo["block_weights"] else "") for lo in r["loras"]]
    lines = [f"Checkpoint `{ckpt['file']}` ({ckpt['family']}, {ckpt['tensors']} tensors, {_mib(ckpt['bytes'])})",
             _table(("LoRA", "Architecture", "Ratio", "Modules", "Ranks", "Block weights"), rows)]
    if "weights_changed" in r:
        lines.append(f"{r['modules_baked']} LoRA modules baked into {r['weights_changed']} weights in "
                     f"{r['seconds']:.1f} s.")
    return lines


def _extract(r: dict) -> list[str]:
    lines = [f"Tuned `{r['tuned']['file']}` minus base `{r['base']['file']}` ({r['tuned']['family']}), rank "
             f"{r['dim']}" + (f", conv rank {r['conv_dim']}" if r["conv_dim"] else ""),
             _table(("Targets", "Count"), sorted(r["targets"].items()))]
    if "modules" in r:
        skipped = ", ".join(r["skipped_text_encoders"]) or "none"
        lines.append(f"{r['modules']} modules written ({r['identical_modules']} identical left out; text encoders "
                     f"left out: {skipped}) in {r['seconds']:.1f} s; smallest share of a module's difference kept "
                     f"{r['retained_min']:.4f}.")
        lines.append(_table(("Block", "Mean share kept"), [(slot, f"{share:.4f}") for slot, share in
                                                           r["retained_by_block"].items()]))
    return lines


def _ckpt_merge(r: dict) -> list[str]:
    formula = "A·(1−M) + B·M" if r["mode"] == "sum" else "A + (B−C)·M"
    inputs = [(key.upper(), r[key]["file"], r[key]["family"]) for key in ("a", "b", "c") if key in r]
    lines = [f"{formula}", _table(("Model", "File", "Family"), inputs),
             _table(("Block", "M"), [(slot, f"{m:g}") for slot, m in r["m_by_block"].items()])]
    if "merged" in r:
        lines.append(f"{r['merged']} keys merged, {r['copied_from_a']} copied from A, {r['copied_from_b']} from B, "
                     f"{r['left_out']} left out, in {r['seconds']:.1f} s.")
    return lines


def _prune(r: dict) -> list[str]:
    ckpt = r["checkpoint"]
    prefixes = ", ".join(f"{p} ({n})" for p, n in r["dropped_prefixes"].items()) or "nothing"
    size = r.get("bytes_out", r["expected_bytes"])
    return [f"`{ckpt['file']}` ({ckpt['family']}): keeps {r['kept']} tensors, drops {r['dropped']} ({prefixes}); "
            f"{_mib(ckpt['bytes'])} → {_mib(size)}"]


def _inspect(r: dict) -> list[str]:
    keys = "every key maps onto the architecture" if r["keys_ok"] else \
        f"**{len(r['unmatched'])} keys map onto no module** (e.g. {', '.join(r['unmatched'][:3])})"
    lines = [f"`{r['path']}`: {r['architecture']} {r['algorithm']}, {r['modules']} modules ({r['unet_modules']} "
             f"UNet, {r['te_modules']} text encoder, {r['conv_modules']} conv); {keys}",
             _table(("Block", "Modules", "Ranks"), [(slot, b["modules"], ", ".join(map(str, b["ranks"])))
                                                    for slot, b in r["by_block"].items()])]
    if r["dora_modules"]:
        lines.append(f"{len(r['dora_modules'])} DoRA modules.")
    meta = [(key, value) for key, value in r["metadata"].items() if key.startswith("ss_") and len(value) < 120]
    if meta:
        lines.append(_table(("Metadata", "Value"), meta[:40]))
    return lines


_FORMATS = {"lbw": _lbw, "merge": _merge, "resize": _resize, "bake": _bake, "extract": _extract,
            "ckpt-merge": _ckpt_merge, "prune": _prune, "inspect": _inspect}


def report_markdown(report: dict[str, Any]) -> str:
    """A job's report as Markdown: what it would do (preview) or what it wrote.

    Args:
        report (dict[str, Any]): `ToolReport.to_dict()`.

    Returns:
        str: a heading line and the tool's tables.
    """
    tool = report["tool"]
    if report["written"]:
        head = f"**{TITLES[tool]}: written** `{report['written']}`"
    else:
        head = f"**{TITLES[tool]}**" + ("" if tool == "inspect" else " (preview, nothing written)")
    return "\n\n".join([head, *_FORMATS[tool](report)])


def progress_markdown(title: str, progress: ToolProgress) -> str:
    """`Bake: 120 / 1131 (11 %)` while a job runs."""
    if not progress.total:
        return f"**{title}:** running…"
    share = 100 * progress.done / progress.total
    return f"**{title}:** {progress.done} / {progress.total} ({share:.0f} %)"


def add_line(text: str, name: str, ratio: float | None) -> str:
    """A file list with `name:ratio` appended (the list the merge and bake sections send).

    Args:
        text (str): the list so far, one `name:ratio[:weights]` per line.
        name (str): the file to add (nothing added when empty).
        ratio (float, optional): its ratio, 1 when not given.

    Returns:
        str: the new list.
    """
    if not (name or "").strip():
        return text or ""
    line = f"{name.strip()}:{1.0 if ratio is None else float(ratio):g}"
    return "\n".join([*(text or "").rstrip().splitlines(), line]).lstrip("\n")


__all__ = ["TITLES", "add_line", "progress_markdown", "report_markdown"]
