"""Run a panel's wired event handler without a server or a browser: the function gradio would call for a trigger,
given the input components' values (their initial values unless the test gives others)."""
from __future__ import annotations


def _handlers(blocks) -> list[tuple[list[tuple[int, str]], list, object]]:
    """(targets as (component id, trigger) pairs, input components, function) for every wired event."""
    if isinstance(blocks.fns, dict):  # gradio >= 4.37: BlockFunction objects carry all of it
        return [([tuple(t) for t in f.targets], list(f.inputs), f.fn) for f in blocks.fns.values()]
    by_id = {block._id: block for block in blocks.blocks.values()}
    handlers = []
    for dependency, block_fn in zip(blocks.dependencies, blocks.fns):
        targets = dependency["targets"]
        if targets and isinstance(targets[0], (list, tuple)):  # gradio 4.0-4.36: [(id, trigger), ...]
            pairs = [tuple(t) for t in targets]
        else:  # gradio 3.41: ids and one trigger
            pairs = [(t, dependency.get("trigger")) for t in targets]
        handlers.append((pairs, [by_id[i] for i in dependency["inputs"]], block_fn.fn))
    return handlers


def run_event(blocks, component, trigger: str = "click", values: dict | None = None):
    """Call the handler wired to `component.<trigger>` as gradio would.

    Args:
        blocks (gr.Blocks): the Blocks holding the panel.
        component: the component whose event to run (a button, a file input...).
        trigger (str, optional): "click", "upload", "change"..., defaults to "click".
        values (dict, optional): {component: value} for inputs; the others take their initial value.

    Returns:
        The handler's return value: a {component: value} dict, a list, or a generator.
    """
    values = values or {}
    for targets, inputs, fn in _handlers(blocks):
        if (component._id, trigger) in targets:
            args = [values[c] if c in values else getattr(c, "value", None) for c in inputs]
            return fn(*args)
    raise AssertionError(f"no {trigger} event wired to {component}")
