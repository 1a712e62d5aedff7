"""What a grid renders: settings, the three axes, the cells in render order, and a time estimate measured before
starting."""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from lora_trainer.errors import ConfigError
from lora_trainer.grids.axes import Axis

DEFAULT_CELL_LIMIT = 64


@dataclass(frozen=True)
class RenderSettings:
    """Everything a host's `render` needs besides prompt, negative prompt and seed.

    Attributes:
        width (int): pixels, a multiple of 8.
        height (int): pixels, a multiple of 8.
        steps (int, optional): sampler steps, defaults to 20.
        cfg_scale (float, optional): classifier-free guidance, defaults to 7.0.
        sampler (str, optional): sampler name (the WebUI's names; standalone: `models.sampling.resolve_sampler`),
            defaults to "Euler".
        clip_skip (int, optional): defaults to 1.
        lora_state (str, optional): which LoRA is applied at which strength; it changes whenever the text encoder
            may encode differently, so a host that caches prompt conditioning must key its cache on it.
    """

    width: int
    height: int
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler"
    clip_skip: int = 1
    lora_state: str = ""


# The host's renderer: (prompt, negative prompt, seed, settings) -> RGB image, with whatever LoRA the grid applied.
Render = Callable[[str, str, int, RenderSettings], Image.Image]


@dataclass(frozen=True)
class GridSettings:
    """The grid's prompt and render settings.

    Attributes:
        prompt (str): the prompt (not empty).
        negative_prompt (str, optional): defaults to "".
        render (RenderSettings): size, steps, guidance, sampler.
    """

    prompt: str
    render: RenderSettings
    negative_prompt: str = ""

    def check(self) -> None:
        """Raise ConfigError on an empty prompt, a size not a multiple of 8 or steps below 1."""
        if not self.prompt.strip():
            raise ConfigError("prompt: empty. Write a prompt (e.g. the trigger word and a few tags).")
        for key in ("width", "height"):
            value = getattr(self.render, key)
            if value < 8 or value % 8:
                raise ConfigError(f"{key}: {value} is not a positive multiple of 8. Use e.g. {max(8, value // 8 * 8)}.")
        if self.render.steps < 1:
            raise ConfigError(f"steps: {self.render.steps}. Use 1 or more.")


@dataclass(frozen=True)
class GridCell:
    """One image of the grid.

    Attributes:
        x (int): column index. y (int): row index. z (int): sub-grid index.
        strength (float): LoRA strength (0 = the base model).
        snapshot (object): the snapshot rendered.
        seed (int): the noise seed.
        weights (ModuleWeights, optional): per-module factors on top of the strength (UNet only, block weights),
            defaults to None (the whole LoRA).
    """

    x: int
    y: int
    z: int
    strength: float
    snapshot: object
    seed: int
    weights: object = None

    @property
    def is_base(self) -> bool:
        """Strength 0: the base model, the same image for every snapshot."""
        return self.strength == 0


@dataclass
class GridPlan:
    """Axes and cells, in render order: base cells first, then one snapshot after another, strength by strength
    (each strength and module-weights value merged once for all seeds).

    Attributes:
        settings (GridSettings): prompt and render settings.
        x (Axis): columns. y (Axis): rows. z (Axis): sub-grids side by side.
        cells (list[GridCell]): every cell.
        best_snapshot (SnapshotValidation, optional): the snapshot with the lowest validation loss, when known.
    """

    settings: GridSettings
    x: Axis
    y: Axis
    z: Axis
    cells: list[GridCell] = field(default_factory=list)
    best_snapshot: object = None

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return self.x, self.y, self.z

    def renders(self) -> int:
        """Images actually rendered: base-model cells are rendered once per seed and shared across snapshots."""
        base_seeds = {c.seed for c in self.cells if c.is_base}
        return sum(1 for c in self.cells if not c.is_base) + len(base_seeds)

    def describe(self) -> dict:
        """The plan as plain data (PNG text, API answers)."""
        return {"prompt": self.settings.prompt, "negative_prompt": self.settings.negative_prompt,
                **{k: v for k, v in asdict(self.settings.render).items() if k != "lora_state"},
                "axes": {name: {"kind": a.kind, "labels": list(a.labels),
                                **({} if a.kind in ("snapshot", "weights") else {"values": list(a.values)})}
                         for name, a in zip("xyz", self.axes)},
                **({"best_snapshot": self.best_snapshot.describe()} if self.best_snapshot is not None else {})}


def _default_layout(by_kind: dict[str, Axis]) -> tuple[str, str, str]:
    """Strength across; then the axes with several values (weights, snapshots, seeds), then the others."""
    several = [kind for kind in ("weights", "snapshot", "seed") if kind in by_kind and len(by_kind[kind]) > 1]
    single = [kind for kind in ("snapshot", "seed", "weights") if kind in by_kind and kind not in several]
    return ("strength", *(several + single)[:2])


def _check_layout(layout: tuple, by_kind: dict[str, Axis]) -> None:
    if len(layout) != 3 or len(set(layout)) != 3 or not set(layout) <= set(by_kind):
        raise ConfigError(f"layout: {layout} must name three different axes of {tuple(by_kind)} (x, y, z). "
                          "Reorder them.")
    left_out = [kind for kind in by_kind if kind not in layout and len(by_kind[kind]) > 1]
    if left_out:
        raise ConfigError(f"layout: {left_out[0]} has {len(by_kind[left_out[0]])} values but no place among x, y, "
                          f"z {tuple(layout)}. Give it one value, or lay it out instead of an axis with one value.")


def plan_grid(settings: GridSettings, strengths: Axis, snapshots: Axis, seeds: Axis,
              layout: tuple[str, str, str] | None = None, weights: Axis | None = None) -> GridPlan:
    """Lay the axes out as columns, rows and sub-grids and list the cells.

    Args:
        settings (GridSettings): checked here.
        strengths (Axis): the strength axis. snapshots (Axis): the snapshot axis. seeds (Axis): the seed axis.
        layout (tuple[str, str, str], optional): axis kinds for x, y, z; defaults to strength across, then the
            weights, snapshot and seed axes with several values (weights first), e.g. snapshots down and seeds as
            sub-grids, or seeds down when there is one snapshot.
        weights (Axis, optional): the module-weights axis (`grids.weights.weights_axis`); an axis left out of the
            layout must have one value, which every cell uses. Defaults to None (the whole LoRA).

    Returns:
        GridPlan: the plan.
    """
    settings.check()
    by_kind = {"strength": strengths, "snapshot": snapshots, "seed": seeds}
    if weights is not None:
        by_kind["weights"] = weights
    layout = tuple(layout) if layout is not None else _default_layout(by_kind)
    _check_layout(layout, by_kind)
    x, y, z = (by_kind[kind] for kind in layout)
    fixed = {kind: axis.values[0] for kind, axis in by_kind.items() if kind not in layout}
    cells = []
    for index in ((i, j, k) for k in range(len(z)) for j in range(len(y)) for i in range(len(x))):
        value = {**fixed, **{axis.kind: axis.values[i] for axis, i in zip((x, y, z), index)}}
        cells.append(GridCell(*index, value["strength"], value["snapshot"], value["seed"], value.get("weights")))
    order = {id(s): n for n, s in enumerate(snapshots.values)}
    weights_order = {id(w): n for n, w in enumerate(weights.values)} if weights is not None else {}
    # strength-major: each (snapshot, strength, weights) is merged into the model once for all its seeds
    cells.sort(key=lambda c: (not c.is_base, order[id(c.snapshot)], c.strength, weights_order.get(id(c.weights), 0),
                              c.seed))
    return GridPlan(settings, x, y, z, cells)


class CellLimitExceeded(ConfigError):
    """The grid has more cells than the limit; the caller asks the user and runs again with confirmation."""

    def __init__(self, cells: int, limit: int):
        super().__init__(f"grid: {cells} cells exceed the limit of {limit}. Confirm to render them all, or use "
                         "fewer strengths, seeds or snapshots.")
        self.cells, self.limit = cells, limit


def check_cell_limit(plan: GridPlan, limit: int = DEFAULT_CELL_LIMIT, confirmed: bool = False) -> None:
    """Raise CellLimitExceeded when the grid is over `limit` cells and the user has not confirmed."""
    if len(plan.cells) > limit and not confirmed:
        raise CellLimitExceeded(len(plan.cells), limit)


@dataclass(frozen=True)
class RenderSpeed:
    """Measured render speed at the grid's size.

    Attributes:
        it_per_s (float): sampler steps per second.
        overhead_s (float): seconds per image outside the steps (text encoding, VAE decode).
    """

    it_per_s: float
    overhead_s: float

    def seconds(self, steps: int) -> float:
        """Seconds for one image of `steps` steps."""
        return steps / self.it_per_s + self.overhead_s


def measure_speed(render: Render, settings: GridSettings, probe_steps: int = 4) -> RenderSpeed:
    """Render two small probes (1 and 1 + `probe_steps` steps) with the model as it is, at the grid's size.

    Args:
        render (Render): the host's renderer.
        settings (GridSettings): prompt, size, sampler.
        probe_steps (int, optional): extra steps of the second probe, defaults to 4.

    Returns:
        RenderSpeed: steps per second and per-image overhead.
    """
    timings = []
    for steps in (1, 1 + probe_steps):
        probe = replace(settings.render, steps=steps, lora_state="speed probe")
        start = time.perf_counter()
        render(settings.prompt, settings.negative_prompt, 0, probe)
        timings.append(time.perf_counter() - start)
    per_step = max((timings[1] - timings[0]) / probe_steps, 1e-6)
    return RenderSpeed(it_per_s=1.0 / per_step, overhead_s=max(timings[0] - per_step, 0.0))


@dataclass(frozen=True)
class GridEstimate:
    """How long a grid will take.

    Attributes:
        cells (int): images in the grid. renders (int): images rendered (base cells shared).
        seconds (float): estimated total. it_per_s (float): measured sampler speed.
    """

    cells: int
    renders: int
    seconds: float
    it_per_s: float

    def describe(self) -> str:
        """"12 cells (11 renders), about 1 min 5 s at 3.2 it/s"."""
        minutes, seconds = divmod(round(self.seconds), 60)
        span = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        return f"{self.cells} cells ({self.renders} renders), about {span} at {self.it_per_s:.1f} it/s"


def estimate_grid(plan: GridPlan, speed: RenderSpeed) -> GridEstimate:
    """Estimate a plan's time from a measured speed.

    Args:
        plan (GridPlan): the grid.
        speed (RenderSpeed): from `measure_speed`.

    Returns:
        GridEstimate: cells, renders and seconds.
    """
    renders = plan.renders()
    return GridEstimate(len(plan.cells), renders, renders * speed.seconds(plan.settings.render.steps), speed.it_per_s)


def prompt_from_metadata(metadata: dict[str, str], max_tags: int = 8) -> str:
    """A default prompt from a LoRA's `ss_tag_frequency`: the most frequent tags of its dataset, trigger word
    first (it is in every caption).

    Args:
        metadata (dict[str, str]): the file's metadata.
        max_tags (int, optional): defaults to 8.

    Returns:
        str: "tag1, tag2, ...", or "" when the file records no tags.
    """
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return ""
    counts: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else ():
        counts.update({str(tag).strip(): int(n) for tag, n in dict(tags).items() if str(tag).strip()})
    return ", ".join(tag for tag, _ in counts.most_common(max_tags))


__all__ = ["DEFAULT_CELL_LIMIT", "CellLimitExceeded", "GridCell", "GridEstimate", "GridPlan", "GridSettings",
           "Render", "RenderSettings", "RenderSpeed", "check_cell_limit", "estimate_grid", "measure_speed",
           "plan_grid", "prompt_from_metadata"]
