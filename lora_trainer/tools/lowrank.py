"""Low-rank decompositions for merge and resize, and the retained-energy report.

A sum of LoRA products `sum_i U_i D_i = U D` (U, D stacked) has its exact SVD from QR factors:
`U = Qu Ru`, `D^T = Qd Rd`, so `U D = Qu (Ru Rd^T) Qd^T` and only the small core `Ru Rd^T` needs an SVD.
This costs O((out + in) r^2) instead of the O(out * in * min(out, in)) of an SVD of the full delta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .blocks import group_by_slot, slot_of

MIN_SINGULAR_VALUE = 1e-6  # below this a layer counts as null; it keeps rank 1 (kohya's floor)


@dataclass(frozen=True)
class Decomposition:
    """`delta ~= up @ down` with singular values `s` (descending) of the full delta.

    Attributes:
        u (torch.Tensor): `[out, k]` left singular vectors.
        s (torch.Tensor): `[k]` singular values.
        vh (torch.Tensor): `[k, in_flat]` right singular vectors.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(up `[out, rank]`, down `[rank, in]`) with `scale * up @ down` = the rank-`rank` truncation.

        The singular values are split evenly (sqrt on each side) so fp16 storage loses as little as possible.
        """
        root = torch.sqrt(self.s[:rank] / scale)
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Decomposition:
    """Exact thin SVD of `up @ down` via QR of both factors and an SVD of the small core.

    Args:
        up (torch.Tensor): `[out, r]`.
        down (torch.Tensor): `[r, in]`.

    Returns:
        Decomposition: with at most min(out, in, r) components.
    """
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    cu, s, cvh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    u = (qu @ cu).float()
    vh = (cvh @ qd.T).float()
    return Decomposition(u, s.float(), vh)


def svd_of_matrix(delta: torch.Tensor) -> Decomposition:
    """Thin SVD of a full delta `[out, ...]` (flattened to `[out, in * kh * kw]`)."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).float(), full_matrices=False)
    return Decomposition(u, s, vh)


def choose_rank(s: torch.Tensor, rank: int | None = None, dynamic: tuple[str, float] | None = None) -> int:
    """The rank to keep.

    Args:
        s (torch.Tensor): singular values, descending.
        rank (int, optional): fixed rank, or the cap of a dynamic choice; defaults to no cap.
        dynamic (tuple[str, float], optional): ("sv_ratio", r): keep values > s[0] / r; ("sv_fro", f): the
            fewest values whose Frobenius share reaches f; ("sv_cumulative", c): the fewest whose sum share
            reaches c.

    Returns:
        int: between 1 and len(s) (a null layer keeps 1).
    """
    available = int(s.numel())
    if available == 0 or float(s[0]) < MIN_SINGULAR_VALUE:
        return 1
    keep = available
    if dynamic is not None:
        method, value = dynamic
        if method == "sv_ratio":
            keep = int((s > s[0] / value).sum())
        elif method in ("sv_fro", "sv_cumulative"):
            weights = s.double() ** 2 if method == "sv_fro" else s.double()
            share = torch.cumsum(weights, 0) / weights.sum()
            target = value ** 2 if method == "sv_fro" else value
            keep = int(torch.searchsorted(share, torch.tensor([target - 1e-12], dtype=share.dtype))[0]) + 1
        else:
            raise ValueError(f"dynamic method {method!r}: unknown. Use sv_ratio, sv_fro or sv_cumulative.")
    if rank is not None:
        keep = min(keep, int(rank))
    return max(1, min(keep, available))


@dataclass
class ModuleEnergy:
    """How much of one module's delta a result keeps.

    Attributes:
        rank_before (int): rank (or number of singular values) before.
        rank_after (int): rank kept.
        total_sq (float): squared Frobenius norm of the exact delta.
        error_sq (float): squared Frobenius norm of (result - exact).
    """

    rank_before: int
    rank_after: int
    total_sq: float
    error_sq: float

    @property
    def retained(self) -> float:
        """Share of the Frobenius norm kept, sqrt(1 - error^2 / total^2) (1 for a null delta)."""
        return math.sqrt(max(0.0, 1.0 - self.error_sq / self.total_sq)) if self.total_sq > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """||result - exact||_F / ||exact||_F (0 for a null delta)."""
        return math.sqrt(self.error_sq / self.total_sq) if self.total_sq > 0 else 0.0


@dataclass
class EnergyReport:
    """Retained Frobenius norm per module, per block and overall, and the largest relative error.

    Attributes:
        modules (dict[str, ModuleEnergy]): by kohya module name.
    """

    modules: dict = field(default_factory=dict)

    def by_block(self) -> dict[str, float]:
        """Slot -> retained share of that block's Frobenius norm."""
        out = {}
        for slot, names in group_by_slot(self.modules).items():
            total = sum(self.modules[n].total_sq for n in names)
            error = sum(self.modules[n].error_sq for n in names)
            out[slot] = math.sqrt(max(0.0, 1.0 - error / total)) if total > 0 else 1.0
        return out

    @property
    def overall(self) -> float:
        total = sum(m.total_sq for m in self.modules.values())
        error = sum(m.error_sq for m in self.modules.values())
        return math.sqrt(max(0.0, 1.0 - error / total)) if total > 0 else 1.0

    @property
    def worst(self) -> tuple[str, float]:
        """(module name, relative error) of the module with the largest relative error."""
        if not self.modules:
            return ("", 0.0)
        name = max(self.modules, key=lambda n: self.modules[n].relative_error)
        return name, self.modules[name].relative_error

    def summary(self) -> dict:
        """A JSON-ready summary: overall, per block, worst module, ranks."""
        worst_name, worst_error = self.worst
        return {"retained_overall": self.overall, "retained_by_block": self.by_block(),
                "largest_relative_error": worst_error, "largest_error_module": worst_name,
                "modules": len(self.modules), "slot_of_worst": slot_of(worst_name) if worst_name else None}


def truncation_energy(s: torch.Tensor, rank: int, rank_before: int) -> ModuleEnergy:
    """The energy figures of keeping the first `rank` singular values."""
    sq = s.double() ** 2
    return ModuleEnergy(rank_before, rank, float(sq.sum()), float(sq[rank:].sum()))


__all__ = ["Decomposition", "EnergyReport", "MIN_SINGULAR_VALUE", "ModuleEnergy", "choose_rank",
           "svd_of_matrix", "svd_of_product", "truncation_energy"]
