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



class PageSession:
    """One page's session: runs events the way the server does for a browser (gradio preprocesses the inputs,
    calls the handler, postprocesses what it returns: updates, gallery items, files), keeping the session's
    `gr.State` values between events as the server does.

    Args:
        blocks (gr.Blocks): the app.
    """

    def __init__(self, blocks):
        self.blocks = blocks
        if isinstance(blocks.fns, dict):  # gradio 4 keeps state in a SessionState
            from gradio.state_holder import SessionState

            self.state = SessionState(blocks)
        else:  # gradio 3.41: a plain dict
            self.state = {}

    def run(self, component, trigger: str = "click", values: dict | None = None) -> dict:
        """Run the event wired to `component.<trigger>`.

        Args:
            component: the component whose event to run.
            trigger (str, optional): "click", "change"..., defaults to "click".
            values (dict, optional): {component: value as the page sends it}; the others send their initial value.

        Returns:
            dict: {output component: value as sent to the page}; an update is a dict with "__type__": "update";
                a `gr.State` output is kept in the session (the page gets None).
        """
        import asyncio

        values = values or {}
        for index, (targets, inputs, _fn) in enumerate(_handlers(self.blocks)):
            if (component._id, trigger) in targets:
                break
        else:
            raise AssertionError(f"no {trigger} event wired to {component}")
        payload = [values[c] if c in values else c.get_config().get("value") for c in inputs]
        if isinstance(self.blocks.fns, dict):
            block_fn = self.blocks.fns[index]
            result = asyncio.run(self.blocks.process_api(block_fn, payload, self.state))
            outputs = block_fn.outputs
        else:
            result = asyncio.run(self.blocks.process_api(index, payload, self.state))
            by_id = {block._id: block for block in self.blocks.blocks.values()}
            outputs = [by_id[i] for i in self.blocks.dependencies[index]["outputs"]]
        return dict(zip(outputs, result["data"]))
