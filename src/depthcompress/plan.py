"""The compression plan: kept activations A, merge boundaries S (the paper's A ⊆ S) and the
convolutions pruned to the identity inside merged blocks (LayerMerge, docs/layermerge.md)."""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanError, plain

if TYPE_CHECKING:
    from .graph import ConvChain


def _positions(values: Iterable[int], what: str) -> frozenset[int]:
    out: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise PlanError(f"{what} must hold integer positions, got {plain(v)!r}")
        out.add(int(v))
    return frozenset(out)


@dataclass(frozen=True)
class Plan:
    """Which activations to keep (``activations`` = A) and where blocks end (``boundaries`` = S).

    Between consecutive elements of ``{0} ∪ S`` all convolutions are merged into one. A position in
    A that had no activation in the original network gets one inserted (the paper's ``add_relu``).
    Each position in ``pruned`` loses its conv and BNs (the identity); it must be reducible.
    """

    activations: frozenset[int]
    boundaries: frozenset[int]
    pruned: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "activations", _positions(self.activations, "activations"))
        object.__setattr__(self, "boundaries", _positions(self.boundaries, "boundaries"))
        object.__setattr__(self, "pruned", _positions(self.pruned, "pruned"))

    @classmethod
    def identity(cls, chain: ConvChain) -> Plan:
        """The plan that keeps the network as it is: every activation kept, no conv merged."""
        return cls(
            activations=frozenset(chain.activation_positions),
            boundaries=frozenset(range(1, chain.num_positions + 1)),
        )

    @classmethod
    def for_activations(cls, chain: ConvChain, activations: Iterable[int]) -> Plan:
        """The coarsest valid plan keeping exactly ``activations``: fewest blocks whose ends
        include A, every hard boundary and L (residuals with an end of A inside get their own
        boundaries, the reference's "skip bumps"). This is the network the importance of a span
        is measured on."""
        keep = _positions(activations, "activations")
        n = chain.num_positions
        bad = sorted(p for p in keep if not 1 <= p <= n)
        if bad:
            raise PlanError(f"activations {bad} are not positions 1..{n} of this chain")
        required = keep | set(chain.barriers) | {n}
        starts: dict[int, list[int]] = {}
        for i, j in chain.blocks:
            starts.setdefault(j, []).append(i)
        best: dict[int, tuple[int, int]] = {0: (0, -1)}
        for j in range(1, n + 1):
            options = [
                (best[i][0] + 1, i)
                for i in starts.get(j, [])
                if i in best and not any(i < r < j for r in required)
            ]
            if options:
                best[j] = min(options)
        if n not in best:
            raise PlanError("no valid block cover keeps these activations")
        ends, j = set(), n
        while j > 0:
            ends.add(j)
            j = best[j][1]
        return cls(activations=keep, boundaries=frozenset(ends))

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """The merged blocks ``(i, j)`` in order: one conv each after merging."""
        ends = sorted(self.boundaries)
        starts = [0, *ends[:-1]]
        return list(zip(starts, ends, strict=True))

    def validate(self, chain: ConvChain) -> None:
        """Raise PlanError naming the first position or block that does not fit ``chain``."""
        n = chain.num_positions
        named = (
            ("activations", self.activations),
            ("boundaries", self.boundaries),
            ("pruned", self.pruned),
        )
        for name, values in named:
            bad = sorted(p for p in values if not 1 <= p <= n)
            if bad:
                raise PlanError(
                    f"plan {name} hold position(s) {bad} that do not exist: this chain has "
                    f"positions 1..{n} (0 is the chain input and cannot be listed)"
                )
        if n not in self.boundaries:
            raise PlanError(f"plan boundaries must contain the last position {n}")
        missing = sorted(self.activations - self.boundaries)
        if missing:
            raise PlanError(
                f"kept activations {missing} are not boundaries: an activation can only sit at the "
                "end of a merged block (A ⊆ S); add them to boundaries or drop them from "
                "activations"
            )
        forced = sorted(set(chain.barriers) - self.boundaries)
        if forced:
            reasons = "; ".join(f"{p}: {chain.barriers[p]}" for p in forced)
            raise PlanError(
                f"positions {forced} are hard boundaries of this chain and must be in the plan's "
                f"boundaries ({reasons})"
            )
        for i, j in self.blocks:
            why = chain.why_invalid(i, j)
            if why is not None:
                raise PlanError(
                    f"boundaries {sorted(self.boundaries)} are not a valid block cover: block "
                    f"({i}, {j}) cannot be merged: {why}"
                )
        self._validate_pruned(chain)

    def _validate_pruned(self, chain: ConvChain) -> None:
        """Every pruned position must hold a conv that the identity can replace exactly."""
        from .pruning import misfit_shortcuts, reducible

        bad = sorted(self.pruned - reducible(chain))
        if bad:
            raise PlanError(
                f"pruned positions {bad} are not reducible: a pruned conv must keep the tensor's "
                "shape (same input and output channels, stride 1, same spatial size) and be "
                "mergeable"
            )
        misfit = misfit_shortcuts(chain, self.pruned, self.boundaries)
        if misfit:
            r = misfit[0]
            raise PlanError(
                f"pruning {sorted(self.pruned & set(range(r.start + 1, r.end + 1)))} shrinks the "
                f"branch of residual ({r.start}, {r.end}) below its shortcut's kernel "
                f"{r.shortcut_kernel}: prune fewer of its convs or put a boundary inside it"
            )

    def to_dict(self) -> dict[str, list[int]]:
        """Plain-data form, sorted, as written to plan.json (``pruned`` only when non-empty, so
        plans without pruning read and write as before)."""
        out = {"activations": sorted(self.activations), "boundaries": sorted(self.boundaries)}
        if self.pruned:
            out["pruned"] = sorted(self.pruned)
        return out

    def to_json(self) -> str:
        """JSON text of the plan."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Read a plan from its plain-data form; other keys (latency, importance...) are ignored."""
        try:
            return cls(
                activations=data["activations"],
                boundaries=data["boundaries"],
                pruned=data.get("pruned", ()),
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(
                f"a plan needs the keys 'activations' and 'boundaries' (lists of positions): {exc}"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse JSON text written by ``to_json`` (or by ``depthcompress solve``)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError("plan JSON must be an object with 'activations' and 'boundaries'")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan from a JSON file."""
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {p} does not exist")
        return cls.from_json(p.read_text())
