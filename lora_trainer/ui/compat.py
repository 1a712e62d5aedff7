"""The few places where gradio 3.41 (AUTOMATIC1111 1.10) and gradio 4.x (Forge) differ, in one module."""
from __future__ import annotations

import inspect
import logging
import time

import gradio as gr

logger = logging.getLogger(__name__)

GRADIO_MAJOR = int(gr.__version__.split(".", 1)[0])


def enable_queue(blocks: gr.Blocks, concurrency: int = 4) -> gr.Blocks:
    """Turn on the queue (needed for generators such as the tagger's progress) with some concurrency.

    Args:
        blocks (gr.Blocks): the app.
        concurrency (int, optional): events that may run at once. Defaults to 4.

    Returns:
        gr.Blocks: the same app.
    """
    if GRADIO_MAJOR >= 4:
        return blocks.queue(default_concurrency_limit=concurrency)
    return blocks.queue(concurrency_count=concurrency)


def notify_info(message: str) -> None:
    """A toast in the browser (gradio >= 3.39); logged as well."""
    logger.info("%s", message)
    if hasattr(gr, "Info"):
        gr.Info(message)


def notify_warning(message: str) -> None:
    """A warning toast in the browser (gradio >= 3.39); logged as well."""
    logger.warning("%s", message)
    if hasattr(gr, "Warning"):
        gr.Warning(message)


def local_theme() -> gr.themes.Base:
    """The default theme with system fonts: the standalone app then loads nothing from the internet."""
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=fonts, font_mono=["ui-monospace", "Consolas", "monospace"])


def launch_kwargs(dataset_dirs: list[str]) -> dict:
    """`Blocks.launch` arguments that let the app serve images from the dataset folders.

    Args:
        dataset_dirs (list[str]): folders whose images the gallery shows.

    Returns:
        dict: keyword arguments for `launch`.
    """
    kwargs: dict = {"allowed_paths": list(dataset_dirs), "show_error": True}
    if GRADIO_MAJOR < 4:
        kwargs["show_api"] = False
    return kwargs


def serve_until_interrupted(blocks: gr.Blocks, **launch_args) -> None:
    """Serve `blocks` until Ctrl-C, then stop at once.

    A plain `launch()` stops uvicorn gracefully, which waits for every open connection; the queue's own keep-alive
    connection to the server can keep that wait going forever. Here the server is told to skip the wait.

    Args:
        blocks (gr.Blocks): the app.
        **launch_args: passed to `Blocks.launch`.
    """
    blocks.launch(prevent_thread_lock=True, **launch_args)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        logger.info("stopping the server")
    finally:
        close_now(blocks)


def close_now(blocks: gr.Blocks) -> None:
    """Stop a launched app without waiting for open connections (see `serve_until_interrupted`)."""
    server = getattr(blocks, "server", None)
    if server is not None:
        server.force_exit = True  # uvicorn: skip the graceful wait for connections and tasks
    blocks.close()


def file_upload(**kwargs) -> gr.File:
    """A `gr.File` input whose handler gets the uploaded file's path (read it with `uploaded_path`).

    gradio 3 names that type "file" (a temp-file object), gradio 4 "filepath" (a str); "file" is gone in 4.

    Args:
        **kwargs: other `gr.File` arguments (label, file_types, elem_id...).

    Returns:
        gr.File: the component.
    """
    return gr.File(type="filepath" if GRADIO_MAJOR >= 4 else "file", **kwargs)


def uploaded_path(value) -> str | None:
    """The path of a `file_upload` value: a str (gradio 4), a temp-file object with `.name` (gradio 3), or None."""
    if value is None or isinstance(value, str):
        return value or None
    return getattr(value, "name", None)


def line_plot(**kwargs) -> gr.LinePlot:
    """A `gr.LinePlot` given only the arguments this gradio takes.

    gradio 4.38+ draws its own plots: tooltips are always on, the width follows the layout, and `width`/`tooltip`
    (which 3.41's Altair plot uses) only raise deprecation warnings there.

    Args:
        **kwargs: `gr.LinePlot` arguments (x, y, title, height, width, tooltip, elem_id...).

    Returns:
        gr.LinePlot: the component.
    """
    accepted = inspect.signature(gr.LinePlot.__init__).parameters
    return gr.LinePlot(**{key: value for key, value in kwargs.items() if key in accepted})


def click_js(button, js: str, inputs: list) -> None:
    """Run browser-side JavaScript on a click, nothing on the server (`_js=` in gradio 3, `js=` in gradio 4).

    Args:
        button (gr.Button): the button.
        js (str): a JS function taking the inputs' values and returning [].
        inputs (list): input components.
    """
    key = "js" if GRADIO_MAJOR >= 4 else "_js"
    button.click(None, inputs=inputs, outputs=[], **{key: js})


__all__ = ["GRADIO_MAJOR", "click_js", "close_now", "enable_queue", "file_upload", "launch_kwargs", "line_plot",
           "local_theme", "notify_info", "notify_warning", "serve_until_interrupted", "uploaded_path"]
