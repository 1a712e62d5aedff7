"""The Tools panel: block weights, merge, resize, bake, extract, checkpoint merge, prune and inspect on files of the
host's Lora and Stable-diffusion folders, one sub-tab each.

Layout and wiring only: the jobs are `tools_ckpt_actions.Tools` (shared with the API routes), the Markdown comes
from `tools_views`. Preview shows what a job will do (block table, ranks, retained energy, what pruning keeps) and
writes nothing; Run writes the new file in a worker thread while a generator event shows its progress twice a
second, and Cancel stops it at the next tensor (no file is written). File lists are refreshed after each run, so a
new LoRA can be picked at once (the host also reloads the WebUI's Lora list). Works on gradio 3.41 and 4.x.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from lora_trainer.ui import compat
from lora_trainer.ui import tools_views as views
from lora_trainer.ui.panel_errors import error_text
from lora_trainer.ui.tools_actions import ToolProgress, ToolReport, parse_specs
from lora_trainer.ui.tools_ckpt_actions import Tools

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
LORA_PRECISIONS = ["keep", "float", "fp16", "bf16"]
CKPT_PRECISIONS = ["keep", "fp16", "bf16", "fp32"]
DYNAMIC = ["fixed rank", "sv_fro", "sv_ratio", "sv_cumulative"]


@dataclass
class ToolsPanel:
    """The panel's components by name (`c["lbw_file"]`, `c["result"]`...), its jobs and the running job's progress.

    Attributes:
        tools (Tools): the jobs on the host's folders.
        c (dict): components by name; their HTML ids are `lt-tl-` + the name with dashes.
        lora_lists (list): Dropdowns listing the Lora folder (refreshed together).
        checkpoint_lists (list): Dropdowns listing the Stable-diffusion folder.
        running (ToolProgress, optional): the job running now (one at a time).
        lock (threading.Lock): guards `running`.
    """

    tools: Tools
    c: dict = field(default_factory=dict)
    lora_lists: list = field(default_factory=list)
    checkpoint_lists: list = field(default_factory=list)
    running: ToolProgress | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def elem_id(name: str) -> str:
    """The HTML id of a component: `lt-tl-` + its name with dashes (`lt-tl-merge-list`)."""
    return f"lt-tl-{name.replace('_', '-')}"


def _error_text(exc: BaseException) -> str:
    """An error as the panel shows it: the message (file or key, and the fix); a bug also says so."""
    return f"**Error:** {error_text(exc, 'tools panel')}"


# -- layout -----------------------------------------------------------------------------------------------------------
def _lora_list(p: ToolsPanel, name: str, label: str):
    p.c[name] = gr.Dropdown(p.tools.folders.loras(), label=label, allow_custom_value=True, elem_id=elem_id(name))
    p.lora_lists.append(p.c[name])


def _checkpoint_list(p: ToolsPanel, name: str, label: str):
    p.c[name] = gr.Dropdown(p.tools.folders.checkpoints(), label=label, allow_custom_value=True,
                            elem_id=elem_id(name))
    p.checkpoint_lists.append(p.c[name])


def _number(p: ToolsPanel, name: str, label: str, value, integer: bool = True):
    p.c[name] = gr.Number(value=value, label=label, precision=0 if integer else None, elem_id=elem_id(name),
                          min_width=100)


def _choice(p: ToolsPanel, name: str, label: str, choices: list[str], value: str | None = None):
    p.c[name] = gr.Dropdown(choices, value=value or choices[0], label=label, elem_id=elem_id(name))


def _run_row(p: ToolsPanel, tool: str, out_label: str, default_out: str = "") -> None:
    with gr.Row(equal_height=True):
        p.c[f"{tool}_out"] = gr.Textbox(value=default_out, label=out_label, scale=3, elem_id=elem_id(f"{tool}_out"))
        p.c[f"{tool}_overwrite"] = gr.Checkbox(False, label="Replace an existing file", scale=1,
                                               elem_id=elem_id(f"{tool}_overwrite"))
        p.c[f"{tool}_preview"] = gr.Button("Preview", scale=1, elem_id=elem_id(f"{tool}_preview"))
        p.c[f"{tool}_run"] = gr.Button("Run", variant="primary", scale=1, elem_id=elem_id(f"{tool}_run"))


def _file_list(p: ToolsPanel, tool: str, label: str) -> None:
    """A `name:ratio[:weights]` list with a picker that appends to it."""
    with gr.Row(equal_height=True):
        _lora_list(p, f"{tool}_add_file", "LoRA to add")
        _number(p, f"{tool}_add_ratio", "Ratio", 1.0, integer=False)
        p.c[f"{tool}_add"] = gr.Button("Add", scale=0, elem_id=elem_id(f"{tool}_add"))
    p.c[f"{tool}_list"] = gr.Textbox(label=label, lines=3, placeholder="a.safetensors:0.7\nb.safetensors:-0.4:OUTD",
                                     elem_id=elem_id(f"{tool}_list"))


def _lora_sections(p: ToolsPanel) -> None:
    presets = sorted(p.tools.presets().presets)
    with gr.Tab("Block weights", elem_id="lt-tl-tab-lbw"):
        with gr.Row():
            _lora_list(p, "lbw_file", "LoRA")
            _choice(p, "lbw_preset", "Preset", presets, "ALL" if "ALL" in presets else None)
        p.c["lbw_weights"] = gr.Textbox(label="Block weights (preset name or 12/17/20/26 values)", value="ALL",
                                        elem_id=elem_id("lbw_weights"))
        _run_row(p, "lbw", "New LoRA (in the Lora folder)")
    with gr.Tab("Merge", elem_id="lt-tl-tab-merge"):
        _file_list(p, "merge", "LoRAs (name:ratio[:block weights], one per line)")
        with gr.Row():
            _number(p, "merge_rank", "Rank (0: exact merge)", 0)
            _number(p, "merge_conv_rank", "Conv rank (0: as rank)", 0)
            _choice(p, "merge_precision", "Save as", LORA_PRECISIONS[1:])
        _run_row(p, "merge", "New LoRA (in the Lora folder)")
    with gr.Tab("Resize", elem_id="lt-tl-tab-resize"):
        with gr.Row():
            _lora_list(p, "resize_file", "LoRA")
            _number(p, "resize_rank", "Rank (cap of a dynamic choice)", 4)
            _choice(p, "resize_dynamic", "Method", DYNAMIC)
            _number(p, "resize_value", "Method value", 0.9, integer=False)
            _number(p, "resize_conv_rank", "Conv rank (0: as rank)", 0)
            _choice(p, "resize_precision", "Save as", LORA_PRECISIONS)
        _run_row(p, "resize", "New LoRA (in the Lora folder)")
    with gr.Tab("Inspect", elem_id="lt-tl-tab-inspect"):
        with gr.Row(equal_height=True):
            _lora_list(p, "inspect_file", "LoRA")
            p.c["inspect_run"] = gr.Button("Inspect", variant="primary", scale=0, elem_id=elem_id("inspect_run"))


def _checkpoint_sections(p: ToolsPanel) -> None:
    with gr.Tab("Bake", elem_id="lt-tl-tab-bake"):
        with gr.Row():
            _checkpoint_list(p, "bake_checkpoint", "Checkpoint")
            _choice(p, "bake_precision", "Save as", CKPT_PRECISIONS)
        _file_list(p, "bake", "LoRAs to bake (name:ratio[:block weights], one per line)")
        _run_row(p, "bake", "New checkpoint (in the Stable-diffusion folder)")
    with gr.Tab("Extract", elem_id="lt-tl-tab-extract"):
        with gr.Row():
            _checkpoint_list(p, "extract_tuned", "Tuned checkpoint")
            _checkpoint_list(p, "extract_base", "Base checkpoint")
        with gr.Row():
            _number(p, "extract_dim", "Rank", 16)
            _number(p, "extract_conv_dim", "Conv rank (0: no 3x3 convs)", 0)
            _number(p, "extract_clamp", "Clamp quantile", 0.99, integer=False)
            _number(p, "extract_min_diff", "Text encoder min difference", 0.01, integer=False)
            _choice(p, "extract_precision", "Save as", CKPT_PRECISIONS[1:])
        _run_row(p, "extract", "New LoRA (in the Lora folder)")
    with gr.Tab("Checkpoint merge", elem_id="lt-tl-tab-ckpt-merge"):
        with gr.Row():
            _checkpoint_list(p, "cm_a", "Model A")
            _checkpoint_list(p, "cm_b", "Model B")
            _checkpoint_list(p, "cm_c", "Model C (add difference)")
        with gr.Row():
            _choice(p, "cm_mode", "Mode", ["sum", "add-diff"])
            _number(p, "cm_alpha", "M", 0.5, integer=False)
            p.c["cm_blocks"] = gr.Textbox(label="M per block (26 values SD1/SD2, 20 SDXL; empty: M everywhere)",
                                          scale=3, elem_id=elem_id("cm_blocks"))
            _choice(p, "cm_precision", "Save as", CKPT_PRECISIONS)
        _run_row(p, "cm", "New checkpoint (in the Stable-diffusion folder)")
    with gr.Tab("Prune", elem_id="lt-tl-tab-prune"):
        with gr.Row():
            _checkpoint_list(p, "prune_checkpoint", "Checkpoint")
            _choice(p, "prune_precision", "Save as", CKPT_PRECISIONS, "fp16")
        _run_row(p, "prune", "New checkpoint (in the Stable-diffusion folder)")


def _folders_text(tools: Tools) -> str:
    folders = tools.folders
    ckpt = f"`{folders.checkpoint_dir}`" if folders.checkpoint_dir else "none given (type full paths)"
    return f"Lora folder `{folders.lora_dir}` · checkpoint folder {ckpt}"


def _layout(p: ToolsPanel) -> None:
    with gr.Row(equal_height=True):
        p.c["folders"] = gr.Markdown(_folders_text(p.tools), elem_id=elem_id("folders"))
        p.c["refresh"] = gr.Button("Refresh file lists", size="sm", scale=0, elem_id=elem_id("refresh"))
    with gr.Tabs(elem_id="lt-tl-tabs"):
        _lora_sections(p)
        _checkpoint_sections(p)
    with gr.Row():
        p.c["cancel"] = gr.Button("Cancel", variant="stop", size="sm", scale=0, elem_id=elem_id("cancel"))
    p.c["result"] = gr.Markdown("", elem_id=elem_id("result"))


# -- jobs: the panel's values -> a call of `Tools` ----------------------------------------------------------------
def _rank(value) -> int | None:
    return int(value) if value else None


def _precision(value: str | None) -> str | None:
    return None if value in (None, "", "keep") else value


def _out(value: str | None, write: bool) -> str | None:
    if not write:
        return None
    if not (value or "").strip():
        raise ValueError("new file: no name given. Type the new file's name (ending in .safetensors), then Run.")
    return value.strip()


def _dynamic(method: str, value) -> str | None:
    return None if method == DYNAMIC[0] else f"{method}:{float(value or 0):g}"


Job = Callable[[ToolProgress | None], ToolReport]
# tool -> (title, input names, builder(tools, write, *values) -> job)
JOBS: dict[str, tuple[str, list[str], Callable[..., Job]]] = {
    "lbw": ("Block weights", ["lbw_file", "lbw_weights"],
            lambda t, w, file, weights, out, over: lambda pr: t.lbw(file, weights, _out(out, w), over, pr)),
    "merge": ("Merge", ["merge_list", "merge_rank", "merge_conv_rank", "merge_precision"],
              lambda t, w, specs, rank, conv, prec, out, over: lambda pr: t.merge(
                  parse_specs(specs), _out(out, w), _rank(rank), _rank(conv), prec, over, pr)),
    "resize": ("Resize", ["resize_file", "resize_rank", "resize_dynamic", "resize_value", "resize_conv_rank",
                          "resize_precision"],
               lambda t, w, file, rank, method, value, conv, prec, out, over: lambda pr: t.resize(
                   file, _rank(rank), _dynamic(method, value), _rank(conv), _out(out, w), _precision(prec), over,
                   pr)),
    "bake": ("Bake", ["bake_checkpoint", "bake_list", "bake_precision"],
             lambda t, w, ckpt, specs, prec, out, over: lambda pr: t.bake(
                 ckpt, parse_specs(specs), _out(out, w), _precision(prec), over, pr)),
    "extract": ("Extract", ["extract_tuned", "extract_base", "extract_dim", "extract_conv_dim", "extract_clamp",
                            "extract_min_diff", "extract_precision"],
                lambda t, w, tuned, base, dim, conv, clamp, diff, prec, out, over: lambda pr: t.extract(
                    tuned, base, _out(out, w), int(dim or 4), _rank(conv), float(clamp), float(diff), prec, over,
                    pr)),
    "cm": ("Checkpoint merge", ["cm_a", "cm_b", "cm_c", "cm_mode", "cm_alpha", "cm_blocks", "cm_precision"],
           lambda t, w, a, b, c, mode, alpha, blocks, prec, out, over: lambda pr: t.ckpt_merge(
               a, b, _out(out, w), c or None, mode, float(alpha), _block_alpha(blocks), _precision(prec), over, pr)),
    "prune": ("Prune", ["prune_checkpoint", "prune_precision"],
              lambda t, w, ckpt, prec, out, over: lambda pr: t.prune(ckpt, _out(out, w), _precision(prec), over,
                                                                    pr)),
}


def _block_alpha(text: str | None) -> list[float] | None:
    from lora_trainer.tools.blocks import parse_vector

    return parse_vector(text, "M per block") if (text or "").strip() else None


# -- handlers ---------------------------------------------------------------------------------------------------------
def _start(p: ToolsPanel) -> ToolProgress | None:
    with p.lock:
        if p.running is not None:
            return None
        p.running = ToolProgress()
        return p.running


def _run_fn(p: ToolsPanel, title: str, make: Callable[..., Job]) -> Callable:
    """A generator event: the job `make(*values)` in a worker thread, its progress twice a second, then its report
    (previews too: an SVD preview or an inspect can take seconds, and gradio 3 drops a silent event)."""
    def run(*values):
        try:
            job = make(*values)
        except Exception as exc:  # a value the form cannot turn into a job
            yield _error_text(exc)
            return
        progress = _start(p)
        if progress is None:
            yield "**Error:** another tool job is running. Wait for it to end or press Cancel."
            return
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(_outcome(job, progress)), name="lora-tool",
                                  daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                yield views.progress_markdown(title, progress)
                thread.join(POLL_SECONDS)
        finally:
            if thread.is_alive():  # the page went away: stop the job rather than leave it running unseen
                progress.cancel.set()
                thread.join()
            with p.lock:
                p.running = None
        yield views.report_markdown(box["report"].to_dict()) if "report" in box else _error_text(box["error"])
    return run


def _outcome(job: Job, progress: ToolProgress) -> dict:
    try:
        return {"report": job(progress)}
    except Exception as exc:  # reported in the panel by the event
        return {"error": exc}


def _wire(p: ToolsPanel) -> None:
    c = p.c
    lists = p.lora_lists + p.checkpoint_lists

    def refresh():
        loras, checkpoints = p.tools.folders.loras(), p.tools.folders.checkpoints()
        return [gr.update(choices=loras) for _ in p.lora_lists] + \
            [gr.update(choices=checkpoints) for _ in p.checkpoint_lists]

    c["refresh"].click(refresh, outputs=lists, show_progress="hidden")
    for tool, (title, names, builder) in JOBS.items():
        inputs = [c[name] for name in names] + [c[f"{tool}_out"], c[f"{tool}_overwrite"]]
        preview = _run_fn(p, title, lambda *values, b=builder: b(p.tools, False, *values))
        run = _run_fn(p, title, lambda *values, b=builder: b(p.tools, True, *values))
        c[f"{tool}_preview"].click(preview, inputs=inputs, outputs=[c["result"]])
        c[f"{tool}_run"].click(run, inputs=inputs, outputs=[c["result"]]).then(refresh, outputs=lists,
                                                                               show_progress="hidden")
    for tool in ("merge", "bake"):
        c[f"{tool}_add"].click(views.add_line, inputs=[c[f"{tool}_list"], c[f"{tool}_add_file"],
                                                        c[f"{tool}_add_ratio"]], outputs=[c[f"{tool}_list"]])
    c["lbw_preset"].change(lambda name: name, inputs=[c["lbw_preset"]], outputs=[c["lbw_weights"]],
                           show_progress="hidden")

    inspect = _run_fn(p, "Inspect", lambda file: lambda _progress: p.tools.inspect(file))
    c["inspect_run"].click(inspect, inputs=[c["inspect_file"]], outputs=[c["result"]])

    def cancel():
        running = p.running
        if running is None:
            return gr.update()
        running.cancel.set()
        compat.notify_info("Cancelling the tool job at its next step.")
        return gr.update()

    c["cancel"].click(cancel, outputs=[c["result"]], show_progress="hidden")


def build_tools_panel(host, folder_policy=None) -> ToolsPanel:
    """Build the Tools panel inside the current `gr.Blocks` (a tab of the WebUI, or the standalone app).

    Args:
        host (Host): gives the Lora and checkpoint folders, the job system and `refresh_loras`.
        folder_policy (PolicySource, optional): the host's folder rule for every path a job names, defaults to
            None (unrestricted).

    Returns:
        ToolsPanel: the components by name and the jobs.
    """
    panel = ToolsPanel(Tools(host, folder_policy))
    with gr.Column(elem_id="lt-tools-panel"):
        _layout(panel)
    _wire(panel)
    return panel


__all__ = ["JOBS", "ToolsPanel", "build_tools_panel", "elem_id"]
