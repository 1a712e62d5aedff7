"""`python -m lora_trainer ui [--port N] [--dataset DIR] [--tagger-dir DIR] [--lora-dir DIR] [--models-dir DIR]
[--device D]`: the whole tab (Dataset and Train panels) in a browser, training with the standalone host.

Serves on 127.0.0.1 only (the panel reads and writes files on this machine). Exit status: 0 after Ctrl-C, 2 when
gradio is missing or the port is taken.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="open the Dataset (tagger + tag editor) and Train panels in a browser",
                       description="Serve the Dataset and Train panels on http://127.0.0.1:PORT.")
    p.add_argument("--port", type=int, default=7870, help="port on 127.0.0.1 (default: 7870)")
    p.add_argument("--dataset", type=Path, help="dataset folder to fill in (holds 10_concept folders)")
    p.add_argument("--tagger-dir", type=Path, help="folder of WD14 tagger model folders (model.onnx + "
                   "selected_tags.csv each)")
    p.add_argument("--lora-dir", type=Path, default=Path("output"),
                   help="where LoRAs go when the Train panel sets no output folder (default: ./output)")
    p.add_argument("--models-dir", type=Path, help="folder of checkpoints offered in the Train panel's dropdown "
                   "(the WebUI's models/Stable-diffusion; subfolders too)")
    p.add_argument("--device", help="device to train on, e.g. cuda or cpu (default: cuda when available)")


def run(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from lora_trainer.host import StandaloneHost
        from lora_trainer.ui import compat
        from lora_trainer.ui.app import create_app
    except ImportError as exc:
        print(f"ui: gradio cannot be imported ({exc}). Install it with `pip install -e \".[ui]\"`.", file=sys.stderr)
        return 2
    dataset = str(args.dataset.resolve()) if args.dataset else None
    tagger_dir = str(args.tagger_dir.resolve()) if args.tagger_dir else None
    lora_dir = args.lora_dir.resolve()
    models_dir = args.models_dir.expanduser().resolve() if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        print(f"ui: --models-dir {models_dir}: not a folder. Give the folder holding your checkpoints (the WebUI's "
              "models/Stable-diffusion).", file=sys.stderr)
        return 2
    app = create_app(StandaloneHost(lora_dir, device=args.device, models_dir=models_dir), dataset, tagger_dir)
    print(f"LoRA trainer (Dataset and Train panels) on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    try:
        app.launch(server_name="127.0.0.1", server_port=args.port, inbrowser=False, prevent_thread_lock=True,
                   **compat.launch_kwargs([d for d in (dataset, str(lora_dir)) if d]))
    except OSError as exc:
        print(f"ui: cannot serve on port {args.port} ({exc}). Pick another with --port.", file=sys.stderr)
        return 2
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _close(app)
    return 0


def _close(app, timeout: float = 5.0) -> None:
    """Close the server, waiting at most `timeout` seconds: gradio 3 can wait forever on a browser event that was
    cut off mid-stream, and Ctrl-C must still end the program (the server thread is a daemon)."""
    closer = threading.Thread(target=app.close, name="close-ui", daemon=True)
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        print("ui: the server did not close in time; exiting anyway", file=sys.stderr)
