"""Text and table views of the tagging package's results for the Dataset panel. Formatting only, no logic."""
from __future__ import annotations

from pathlib import Path

from lora_trainer.progress import ProgressInfo, format_seconds
from lora_trainer.tagging import DatasetReport, EditResult, ReloadResult, SaveResult, TagEditor
from lora_trainer.ui.thumbnails import thumbnails

MAX_GALLERY = 400
FREQ_HEADERS = ["tag", "images", "share"]


def _md(text: str) -> str:
    """Escape what Markdown would eat in tags (`_`, `*`, `|`, brackets)."""
    for ch in "\\`*_[]|<>":
        text = text.replace(ch, "\\" + ch)
    return text


def frequency_rows(editor: TagEditor, sort: str = "count", scope: str = "all") -> list[list]:
    """Rows [tag, images, share %] of the tag frequency table.

    Args:
        editor (TagEditor): the loaded dataset.
        sort (str, optional): "count" or "name". Defaults to "count".
        scope (str, optional): "all" or "selection". Defaults to "all".

    Returns:
        list[list]: one row per tag (one empty row when there are none, so the table keeps its columns).
    """
    rows = [[c.tag, c.count, f"{100 * c.share:.0f}%"] for c in editor.tag_frequency(sort=sort, scope=scope)]
    return rows or [["", 0, ""]]


def gallery_items(editor: TagEditor, indices: list[int]) -> list[tuple[str, str]]:
    """(thumbnail path, label) pairs for the gallery, at most MAX_GALLERY."""
    shown = [editor.images[i] for i in indices[:MAX_GALLERY]]
    return list(zip(thumbnails([e.image_path for e in shown]), [e.rel_path for e in shown]))


def selection_label(editor: TagEditor, shown: int) -> str:
    """'N of M selected' (and how many the gallery shows when it is cut)."""
    n = len(editor.selection)
    text = f"**{n} of {len(editor)} selected**"
    if shown < n:
        text += f" (gallery shows the first {shown})"
    return text


def edit_message(result: EditResult | None, what: str = "") -> str:
    """One line for a batch edit, undo or redo."""
    if result is None:
        return f"Nothing to {what}." if what else "Nothing changed."
    scope = "whole dataset" if result.scope == "all" else result.scope
    text = f"{result.operation}: changed {result.n_changed} of {result.in_scope} images ({scope})."
    if result.skipped:
        text += f" {len(result.skipped)} images with unreadable (non-UTF-8) captions were left alone."
    return text


def save_message(result: SaveResult, root: Path) -> str:
    """What a save did: files written, failures and conflicts with their fix."""
    n = len(result.written) + len(result.removed)
    lines = [f"Saved {n} changed caption file{'s' if n != 1 else ''}."]
    if result.removed:
        lines.append(f"{len(result.removed)} empty caption files removed (they did not exist at load).")
    if result.interrupted:
        lines.append(f"**Saving stopped:** {result.interrupted}")
    for failure in result.failed:
        lines.append(f"- not written: {failure.message}")
    if result.conflicts:
        lines.append(f"**{len(result.conflicts)} files changed on disk since they were loaded and were NOT written.** "
                     "Press *Overwrite conflicts* to keep your edits, or *Take disk versions* to drop them.")
        lines += [f"- {_rel(c.path, root)}: disk now `{c.disk_text[:80]}`" for c in result.conflicts[:20]]
    return "\n".join(lines)


def reload_message(result: ReloadResult, root: Path) -> str:
    """What a reload did: captions taken from disk, conflicts, images added or gone."""
    lines = [f"Reloaded: {len(result.taken)} captions taken from disk (undo takes them back)."]
    if result.conflicts:
        lines.append(f"**{len(result.conflicts)} captions changed on disk AND edited here**: your edits are kept. "
                     "*Take disk versions* drops them; *Overwrite conflicts* writes yours.")
        lines += [f"- {_rel(c.path, root)}: disk `{c.disk_text[:80]}`, here `{c.editor_text[:80]}`"
                  for c in result.conflicts[:20]]
    if result.new_images:
        lines.append(f"{len(result.new_images)} new images on disk: press Load to edit them.")
    if result.missing_images:
        lines.append(f"{len(result.missing_images)} loaded images are gone from disk.")
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def load_message(editor: TagEditor) -> str:
    """Summary of a freshly loaded dataset, with what was skipped."""
    concepts = [f for f in editor.folders.values() if f.is_concept]
    text = f"Loaded {len(editor)} images in {len(concepts)} concept folders from `{editor.root}`."
    if editor.plain_folders:
        text += f" Folders without a repeat prefix (not trained): {', '.join(editor.plain_folders)}."
    if editor.problems:
        text += "\n" + "\n".join(f"- {p}" for p in editor.problems[:20])
    return text


def _balance_lines(report: DatasetReport) -> list[str]:
    bal = report.balance
    out = ["### Concept balance", "", "| folder | images | repeats | images x repeats | share |",
           "|---|---|---|---|---|"]
    out += [f"| {_md(r.folder)} | {r.images} | {r.repeats} | {r.weight} | {100 * r.share:.0f}% |" for r in bal.rows]
    out.append("")
    if not bal.warnings:
        return out + ["Balanced: no concept outweighs another by more than 2x.", ""]
    return out + [f"**Warning:** {_md(w)}\n" for w in bal.warnings]


def _association_lines(report: DatasetReport) -> list[str]:
    out = ["### Associations (tags that come together)", ""]
    if not report.associations:
        return out + ["No strong associations (at least 3 images together, lift >= 2)."]
    out += ["| when | also | together | P(also given when) | lift |", "|---|---|---|---|---|"]
    return out + [f"| {_md(a.tag_a)} | {_md(a.tag_b)} | {a.count_ab} | {100 * a.p_b_given_a:.0f}% | {a.lift:.1f} |"
                  for a in report.associations[:30]]


def _universal_lines(report: DatasetReport) -> list[str]:
    out = ["### Near-universal tags (in >= 90% of a concept's images)", ""]
    if not report.universal:
        return out + ["None."]
    out += ["| folder | tag | images | note |", "|---|---|---|---|"]
    for u in report.universal:
        note = "trigger word" if u.is_trigger else "prune so the trigger word absorbs it?"
        out.append(f"| {_md(u.folder)} | {_md(u.tag)} | {u.count}/{u.images} | {note} |")
    return out


def analysis_markdown(report: DatasetReport) -> str:
    """Concept balance (with its warnings), associations and near-universal tags as Markdown."""
    return "\n".join(_balance_lines(report) + _association_lines(report) + [""] + _universal_lines(report))


def progress_text(info: ProgressInfo, provider: str) -> str:
    """Tagger progress: done/total, rate, ETA and the ONNX provider."""
    eta = "?" if info.eta_s is None else format_seconds(info.eta_s)
    return (f"Tagging on **{provider}**: {info.done}/{info.total} images, {info.rate_per_s:.1f} img/s, "
            f"elapsed {format_seconds(info.elapsed_s)}, ETA {eta}")


def unusable_markdown(unusable: dict[int, str], root: Path) -> str:
    """The images the analysis leaves out because training skips them (corrupt, truncated, unreadable), or ""."""
    if not unusable:
        return ""
    lines = [f"**{len(unusable)} images left out** (training skips them; fix or remove them):"]
    lines += [f"- {message}" for message in list(unusable.values())[:30]]
    if len(unusable) > 30:
        lines.append(f"- ... and {len(unusable) - 30} more.")
    return "\n".join(lines) + "\n\n"


def tag_summary_markdown(summary, root: Path) -> str:
    """The tagger's summary (tag_folder's TagSummary): counts, provider, failures with reasons."""
    state = "Stopped" if summary.interrupted else "Cancelled" if summary.cancelled else "Done"
    lines = [(f"{state} on **{summary.provider}** in {summary.seconds:.1f} s: {summary.tagged} captions written, "
              f"{summary.skipped} kept, {len(summary.failed)} failed.")]
    if summary.interrupted:
        lines.append(f"**Writing stopped:** {summary.interrupted}")
    lines += [f"- {_rel(path, root)}: {reason}" for path, reason in summary.failed[:30]]
    if len(summary.failed) > 30:
        lines.append(f"- ... and {len(summary.failed) - 30} more (see the log).")
    return "\n".join(lines)


__all__ = [
    "FREQ_HEADERS",
    "MAX_GALLERY",
    "analysis_markdown",
    "edit_message",
    "frequency_rows",
    "gallery_items",
    "load_message",
    "progress_text",
    "reload_message",
    "save_message",
    "selection_label",
    "tag_summary_markdown",
    "unusable_markdown",
]
