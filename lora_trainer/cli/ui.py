"""`python -m lora_trainer ui [--port N] [--dataset DIR] [--tagger-dir DIR]`: the Dataset panel in a browser.

Serves on 127.0.0.1 only (the panel reads and writes files on this machine). Exit status: 0 after Ctrl-C, 2 when
gradio is missing or the port is taken.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="open the Dataset panel (tagger + tag editor) in a browser",
                       description="Serve the Dataset panel on http://127.0.0.1:PORT.")
    p.add_argument("--port", type=int, default=7870, help="port on 127.0.0.1 (default: 7870)")
    p.add_argument("--dataset", type=Path, help="dataset folder to fill in (holds 10_concept folders)")
    p.add_argument("--tagger-dir", type=Path, help="folder of WD14 tagger model folders (model.onnx + "
                   "selected_tags.csv each)")


def run(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from lora_trainer.ui import compat
        from lora_trainer.ui.dataset_panel import create_app
    except ImportError as exc:
        print(f"ui: gradio cannot be imported ({exc}). Install it with `pip install -e \".[ui]\"`.", file=sys.stderr)
        return 2
    dataset = str(args.dataset.resolve()) if args.dataset else None
    tagger_dir = str(args.tagger_dir.resolve()) if args.tagger_dir else None
    app = create_app(dataset, tagger_dir)
    print(f"Dataset panel on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    try:
        app.launch(server_name="127.0.0.1", server_port=args.port, inbrowser=False,
                   **compat.launch_kwargs([d for d in (dataset,) if d]))
    except OSError as exc:
        print(f"ui: cannot serve on port {args.port} ({exc}). Pick another with --port.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        app.close()
    return 0
