"""`python -m lora_trainer tags DIR [edits] [--filter T ...] [--dry-run] [--undo|--complete] [--report]`.

Edits run in this order: --replace, --rename, --remove, --add, --move-front, --dedupe, --sort; on the images
matching --filter (all of the tags, or any with --any; minus --exclude), or on every image. Changed captions
are written atomically with a one-time backup (``.caption_backup/`` beside them), through the caption journal
``.lora_trainer_tags_journal.jsonl`` at DIR (see `tagging.caption_journal`): the old and new bytes of every file
are recorded before it changes, so `--undo` restores them exactly (newest save first, the last 20 are kept),
also for a save cut short by a kill or a full disk, which `--complete` can instead finish. Saves by `tag` and the
Dataset panel go into the same journal.
"""
from __future__ import annotations

import logging
from pathlib import Path

from lora_trainer.data.caption_files import JOURNAL_FILE
from lora_trainer.errors import LoraTrainerError

log = logging.getLogger(__name__)

HISTORY_FILE = JOURNAL_FILE


def add_parser(sub) -> None:
    p = sub.add_parser("tags", help="batch-edit caption tags (add, remove, replace, ...), undo, report",
                       epilog="examples: tags train --add mychar --front | tags train --filter rain --remove umbrella "
                              "| tags train --undo | tags train --report (give DIR first: tag lists take every "
                              "following word)")
    p.add_argument("dir", type=Path, help="dataset folder (holding N_concept folders)")
    p.add_argument("--ext", default=".txt", help="caption extension (default .txt)")
    p.add_argument("--add", nargs="+", metavar="TAG", help="add tags (at the end, or first with --front)")
    p.add_argument("--front", action="store_true", help="with --add: put the new tags first")
    p.add_argument("--remove", nargs="+", metavar="TAG", help="remove tags")
    p.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="replace text inside tags")
    p.add_argument("--regex", action="store_true", help="with --replace: OLD is a regular expression")
    p.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), help="rename a whole tag")
    p.add_argument("--move-front", nargs="+", metavar="TAG", help="move these tags first (when present)")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags")
    p.add_argument("--sort", action="store_true", help="sort tags by name")
    p.add_argument("--keep", type=int, default=0, metavar="N", help="with --sort: leave the first N tags in place")
    p.add_argument("--filter", nargs="+", metavar="TAG", help="edit only images holding all these tags")
    p.add_argument("--any", action="store_true", help="with --filter: images holding any of the tags")
    p.add_argument("--exclude", nargs="+", metavar="TAG", help="leave out images holding any of these tags")
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    p.add_argument("--force", action="store_true", help="overwrite captions changed on disk meanwhile")
    p.add_argument("--undo", action="store_true",
                   help="restore the captions changed by the last recorded save (tags, tag, the Dataset panel), "
                        "also one cut short by a kill or a full disk; run again to go further back")
    p.add_argument("--complete", action="store_true",
                   help="write the rest of an interrupted save from the journal")
    p.add_argument("--report", action="store_true", help="print tag frequency, concept balance and associations")
    p.add_argument("--top", type=int, default=30, metavar="N", help="rows per report table (default 30)")
    p.add_argument("--min-count", type=int, default=3, metavar="N", help="association report: least joint count")


def run(args) -> int:
    try:
        if args.undo or args.complete:
            flag = "--undo" if args.undo else "--complete"
            if _edits_requested(args) or (args.undo and args.complete):
                print(f"error: {flag} cannot be combined with edits or with each other. Run {flag} alone, "
                      "then edit again.")
                return 2
            return _restore(args.dir, args.force, args.dry_run, complete=not args.undo)
        return _edit_and_report(args)
    except (LoraTrainerError, ValueError, OSError) as error:
        print(f"error: {error}")
        return 2


def _edits_requested(args) -> bool:
    return bool(args.add or args.remove or args.replace or args.rename or args.move_front or args.dedupe or args.sort)


def _apply_edits(editor, args, scope: str) -> list:
    results = []
    if args.replace:
        results.append(editor.replace(args.replace[0], args.replace[1], scope=scope, regex=args.regex))
    if args.rename:
        results.append(editor.rename_tag(args.rename[0], args.rename[1], scope=scope))
    if args.remove:
        results.append(editor.remove_tags(args.remove, scope=scope))
    if args.add:
        results.append(editor.add_tags(args.add, scope=scope, front=args.front))
    if args.move_front:
        results.append(editor.move_to_front(args.move_front, scope=scope))
    if args.dedupe:
        results.append(editor.dedupe(scope=scope))
    if args.sort:
        results.append(editor.sort_tags(scope=scope, keep=args.keep))
    return results


def _edit_and_report(args) -> int:
    from lora_trainer.data.caption_files import check_caption_extension
    from lora_trainer.tagging import TagEditor

    check_caption_extension(args.ext, "--ext")

    editor = TagEditor.load(args.dir, caption_extension=args.ext)
    print(f"{len(editor)} images in {len(editor.folders)} folders under {args.dir}")
    for problem in editor.problems:
        print(f"warning: {problem}")
    scope = "all"
    if args.filter or args.exclude:
        n = editor.select_where(include=args.filter or (), exclude=args.exclude or (), mode="any" if args.any else "all")
        scope = "selection"
        print(f"filter: {n} images selected")
    code = 0
    if _edits_requested(args):
        for result in _apply_edits(editor, args, scope):
            skipped = f", {len(result.skipped)} non-UTF-8 captions left alone" if result.skipped else ""
            print(f"{result.operation}: {result.n_changed} of {result.in_scope} images changed ({result.scope}){skipped}")
        code = _dry_run(editor, args.top) if args.dry_run else save_with_history(editor, args.dir, args.force)
    if args.report:
        print_report(editor, args.top, args.min_count)
    return code


def _dry_run(editor, top: int) -> int:
    dirty = editor.dirty()
    print(f"dry run: {len(dirty)} captions would be written")
    for i in dirty[:top]:
        print(f"  {editor.images[i].rel_path}\n    - {editor.original_caption(i)}\n    + {editor.caption(i)}")
    return 0


def save_with_history(editor, root: Path, force: bool = False) -> int:
    """Save the editor's changed captions through the caption journal and print what happened.

    Args:
        editor (TagEditor): the edited captions.
        root (Path): the dataset folder (the journal's place).
        force (bool, optional): overwrite captions changed on disk since load. Defaults to False.

    Returns:
        int: 0 when everything was written, 1 when some files failed or conflicted or writing had to stop.
    """
    result = editor.save(force=force, source="tags")
    print(f"saved {len(result.written)} captions" + (f", removed {len(result.removed)}" if result.removed else ""))
    for failure in result.failed:
        print(f"error: {failure.message}")
    for conflict in result.conflicts:
        print(f"conflict: {conflict.path} changed on disk since it was read; not written (use --force to overwrite)")
    if result.interrupted:
        print(f"error: {result.interrupted}")
    return 0 if result.ok else 1


def _restore(root: Path, force: bool, dry_run: bool, complete: bool) -> int:
    from lora_trainer.tagging.journaled_writes import complete_last_run, undo_last_run

    report = (complete_last_run if complete else undo_last_run)(root, force=force, dry_run=dry_run)
    run_ = report.run
    if run_ is None:
        print(report.note)
        return 1
    what = "written" if complete else "restored"
    label = f"the {'interrupted ' if report.interrupted else ''}{run_.source} run of {run_.time}"
    if report.conflicts and not force:
        for rel in report.conflicts:
            print(f"conflict: {root / rel} changed since {label}; nothing {what} (use --force)")
        return 1
    if dry_run:
        print(f"dry run: {len(report.files)} captions would be {what} from {label}")
        for rel in report.files:
            print(f"  {rel}")
        return 0
    for message in report.failed:
        print(f"error: {message}")
    if report.failed:
        return 1
    print(f"{what} {len(report.files)} captions from {label}")
    return 0


def undo_last_run(root: Path, force: bool = False, dry_run: bool = False) -> int:
    """Restore the captions changed by the newest recorded save (`tags`, `tag`, the editor; interrupted or not).

    Args:
        root (Path): the dataset folder.
        force (bool, optional): restore also files changed again since that run. Defaults to False.
        dry_run (bool, optional): only list the files that would be restored. Defaults to False.

    Returns:
        int: 0 when restored, 1 when nothing was recorded, some files were changed since (nothing restored then)
        or failed.
    """
    return _restore(root, force, dry_run, complete=False)


def complete_last_run(root: Path, force: bool = False, dry_run: bool = False) -> int:
    """Write the rest of an interrupted save from the new texts the journal recorded.

    Args:
        root (Path): the dataset folder.
        force (bool, optional): write also files changed since by something else. Defaults to False.
        dry_run (bool, optional): only list the files that would be written. Defaults to False.

    Returns:
        int: 0 when written, 1 when there is no interrupted save, conflicts or failures.
    """
    return _restore(root, force, dry_run, complete=True)


def print_report(editor, top: int = 30, min_count: int = 3) -> None:
    """Print tag frequency, concept balance, associations and near-universal tags."""
    from lora_trainer.tagging.analysis import analyze

    unusable = editor.unusable_images()
    report = analyze(editor.records(usable_only=True), min_count=min_count)
    if unusable:
        print(f"\n{len(unusable)} images left out (training skips them):")
        for message in unusable.values():
            print(f"  {message}")
    print(f"\ntag frequency ({len(report.frequency)} tags, {report.images} images):")
    for row in report.frequency[:top]:
        print(f"  {row.count:6d}  {row.share:6.1%}  {row.tag}")
    balance = report.balance
    print(f"\nconcept balance (images x repeats = {balance.total_weight} samples per epoch):")
    for row in balance.rows:
        print(f"  {row.folder:<30} {row.images:5d} images x {row.repeats:3d} = {row.weight:6d}  {row.share:6.1%}")
    for warning in balance.warnings:
        print(f"  warning: {warning}")
    print(f"\ntag associations (together in >= {min_count} images, lift >= 2):")
    for a in report.associations[:top]:
        print(f"  {a.tag_a} -> {a.tag_b}: {a.count_ab} of {a.count_a} ({a.p_b_given_a:.0%}), lift {a.lift:.1f}, PMI {a.pmi:.2f}")
    print("\nnear-universal tags per concept (>= 90% of its images; prune so the trigger word absorbs them):")
    for u in report.universal[:top * 3]:
        note = "  (trigger word)" if u.is_trigger else ""
        print(f"  {u.folder:<30} {u.tag}: {u.count}/{u.images}{note}")
