"""Run a panel's wired event handler without a server or a browser: the function gradio would call for a trigger,
given the input components' values (their initial values unless the test gives others)."""
from __future__ import annotations


def _targets(dependency: dict) -> list[tuple[int, str]]:
    targets = dependency["targets"]
    if targets and isinstance(targets[0], (list, tuple)):  # gradio 4: [(id, trigger), ...]
        return [tuple(t) for t in targets]
    return [(t, dependency.get("trigger")) for t in targets]  # gradio 3.41: ids and one trigger


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
    by_id = {block._id: block for block in blocks.blocks.values()}
    for index, dependency in enumerate(blocks.dependencies):
        if (component._id, trigger) in _targets(dependency):
            inputs = [by_id[i] for i in dependency["inputs"]]
            args = [values[c] if c in values else getattr(c, "value", None) for c in inputs]
            return blocks.fns[index].fn(*args)
    raise AssertionError(f"no {trigger} event wired to {component}")
