"""`python -m lora_trainer tags DIR [edits] [--filter T ...] [--dry-run] [--undo] [--report]`: batch-edit captions.

Edits run in this order: --replace, --rename, --remove, --add, --move-front, --dedupe, --sort; on the images
matching --filter (all of the tags, or any with --any; minus --exclude), or on every image. Changed captions
are written atomically with a one-time backup (``.caption_backup/`` beside them). Each run that writes
records the previous bytes of the files it changed in ``.lora_trainer_tags_history.json`` at DIR, so
`--undo` restores them exactly (runs are undone newest first; the last 20 are kept).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
from pathlib import Path

from lora_trainer.errors import LoraTrainerError

log = logging.getLogger(__name__)

HISTORY_FILE = ".lora_trainer_tags_history.json"
HISTORY_RUNS = 20


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
    p.add_argument("--undo", action="store_true", help="restore the captions changed by the last tags run")
    p.add_argument("--report", action="store_true", help="print tag frequency, concept balance and associations")
    p.add_argument("--top", type=int, default=30, metavar="N", help="rows per report table (default 30)")
    p.add_argument("--min-count", type=int, default=3, metavar="N", help="association report: least joint count")


def run(args) -> int:
    try:
        if args.undo:
            if _edits_requested(args):
                print("error: --undo cannot be combined with edits. Run --undo alone, then edit again.")
                return 2
            return undo_last_run(args.dir, force=args.force, dry_run=args.dry_run)
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


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _before(entry: dict) -> bytes | None:
    return None if entry["before"] is None else base64.b64decode(entry["before"])


def _load_history(root: Path) -> dict:
    path = root / HISTORY_FILE
    if not path.is_file():
        return {"version": 1, "runs": []}
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LoraTrainerError(f"{path}: not a readable tags history ({err}). Delete it to start a new history.") from err
    if not isinstance(history, dict) or not isinstance(history.get("runs"), list):
        raise LoraTrainerError(f"{path}: not a tags history file. Delete it to start a new history.")
    return history


def _store_history(root: Path, history: dict) -> None:
    from lora_trainer.tagging.caption_store import atomic_write_bytes

    history["runs"] = history["runs"][-HISTORY_RUNS:]
    atomic_write_bytes(root / HISTORY_FILE, json.dumps(history, indent=1).encode("utf-8"))


def save_with_history(editor, root: Path, force: bool = False) -> int:
    """Save the editor's changed captions and append their previous bytes to the history file.

    Args:
        editor (TagEditor): the edited captions.
        root (Path): the dataset folder (history file location).
        force (bool, optional): overwrite captions changed on disk since load. Defaults to False.

    Returns:
        int: 0 when everything was written, 1 when some files failed or conflicted.
    """
    dirty = editor.dirty()
    before = {editor.images[i].caption_path: _read_bytes(editor.images[i].caption_path) for i in dirty}
    result = editor.save(force=force)
    files = []
    for path in result.written + result.removed:
        rel = path.relative_to(editor.root).as_posix()
        old = before.get(path)
        files.append({"path": rel, "before": None if old is None else base64.b64encode(old).decode("ascii"),
                      "after_sha256": _sha(_read_bytes(path))})
    if files:
        history = _load_history(root)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        history["runs"].append({"time": stamp, "files": files})
        _store_history(root, history)
    print(f"saved {len(result.written)} captions" + (f", removed {len(result.removed)}" if result.removed else ""))
    for failure in result.failed:
        print(f"error: {failure.message}")
    for conflict in result.conflicts:
        print(f"conflict: {conflict.path} changed on disk since it was read; not written (use --force to overwrite)")
    return 0 if result.ok else 1


def undo_last_run(root: Path, force: bool = False, dry_run: bool = False) -> int:
    """Restore the captions changed by the last `tags` run from the history file.

    Files already holding their previous bytes are left alone, so an interrupted undo can be run again.

    Args:
        root (Path): the dataset folder.
        force (bool, optional): restore also files changed again since that run. Defaults to False.
        dry_run (bool, optional): only list the files that would be restored. Defaults to False.

    Returns:
        int: 0 when restored, 1 when some files were changed since (nothing restored then) or failed.
    """
    from lora_trainer.tagging.caption_store import write_caption_bytes

    history = _load_history(root)
    if not history["runs"]:
        print(f"nothing to undo: no {HISTORY_FILE} runs in {root}")
        return 1
    run_ = history["runs"][-1]
    pending, changed = [], []
    for f in run_["files"]:
        now = _sha(_read_bytes(root / f["path"]))
        if now == _sha(_before(f)):
            continue
        pending.append(f)
        if now != f["after_sha256"]:
            changed.append(f)
    if changed and not force:
        for f in changed:
            print(f"conflict: {root / f['path']} changed since the last tags run; nothing restored (use --force)")
        return 1
    if dry_run:
        print(f"dry run: {len(pending)} captions would be restored from the run of {run_['time']}")
        for f in pending:
            print(f"  {f['path']}")
        return 0
    failed = 0
    for f in pending:
        path = root / f["path"]
        try:
            if f["before"] is None:
                path.unlink(missing_ok=True)
            else:
                write_caption_bytes(path, _before(f), backup=False)
        except (LoraTrainerError, OSError) as err:
            failed += 1
            print(f"error: {err}")
    if failed:
        return 1
    history["runs"].pop()
    _store_history(root, history)
    print(f"restored {len(run_['files'])} captions from the run of {run_['time']}")
    return 0


def print_report(editor, top: int = 30, min_count: int = 3) -> None:
    """Print tag frequency, concept balance, associations and near-universal tags."""
    from lora_trainer.tagging.analysis import analyze

    report = analyze(editor.records(), min_count=min_count)
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
