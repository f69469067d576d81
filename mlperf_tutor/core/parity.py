"""Parity comparison: per-tensor max-abs and relative error, collected in a report.

Bars (DESIGN.md, "Parity"), defined here once for the workloads' parity runs and for
:mod:`mlperf_tutor.migrate`: outputs and losses max-abs <= 1e-5 (:data:`OUTPUT_ATOL`); gradients
and parameters after N steps relative (||a-b|| / ||b||) <= 1e-4 (:data:`STEP_RTOL`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

OUTPUT_ATOL = 1e-5
STEP_RTOL = 1e-4
# A relative comparison also passes when every element agrees to this absolute difference. Some
# tensors are zero in exact arithmetic and pure round-off in practice; their relative error is
# noise over noise. The attention key bias was one (softmax ignores a shift shared by all keys of
# a query; measured relative errors of 1.3-2.4 at absolute values near 1e-12 on BERT tiny) until
# the layers made its gradient exactly zero (``Attention._keys``); the floor remains for such
# tensors in user models. 1e-7 is below float32's resolution of values of order one, so no real
# disagreement of a unit-scale tensor passes.
REL_ABS_FLOOR = 1e-7


class VerificationError(AssertionError):
    """A port's numbers differ from the reference's beyond the parity bars (a migrated training
    step from the torch step, generated Flax code from the torch module)."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor compared between two frameworks.

    Attributes:
        group: what kind of tensor ("output", "gradient", "parameter", "optimizer state", ...).
        name: tensor name (canonical for weights).
        pair: e.g. "torch-jax".
        max_abs: max |a - b|.
        rel: ||a - b|| / ||b|| (0 when both are zero).
        metric: "max_abs" or "rel": which of the two is held to ``bound`` (a "rel" row also
            passes when ``max_abs <= REL_ABS_FLOOR``).
        bound: the tolerance.
    """

    group: str
    name: str
    pair: str
    max_abs: float
    rel: float
    metric: str
    bound: float

    @property
    def error(self) -> float:
        return self.max_abs if self.metric == "max_abs" else self.rel

    @property
    def floored(self) -> bool:
        """Passes only through the absolute floor of relative comparisons."""
        return self.metric == "rel" and self.max_abs <= REL_ABS_FLOOR and self.error > self.bound

    @property
    def ok(self) -> bool:
        return self.floored or bool(self.error <= self.bound)

    @property
    def score(self) -> float:
        """Error over bound (0 for a floored row): above 1 fails; ranks rows for ``worst``."""
        if self.floored:
            return 0.0
        return self.error / self.bound if self.bound > 0 else float("inf")


def errors(a, b) -> tuple[float, float]:
    """(max-abs, relative) error of ``a`` against ``b``, computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    diff = a - b
    max_abs = float(np.max(np.abs(diff)))
    denom = float(np.linalg.norm(b))
    num = float(np.linalg.norm(diff))
    rel = num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))
    return max_abs, rel


class ParityReport:
    """A list of :class:`Comparison` rows with a verdict and printable tables."""

    def __init__(self, rows: list[Comparison] | None = None):
        self.rows: list[Comparison] = list(rows or [])
        # Training loss per step and framework, when the report comes from a training run.
        self.losses: dict[str, list[float]] = {}

    def add(self, group, name, pair, a, b, metric="max_abs", bound=OUTPUT_ATOL) -> Comparison:
        """Compare ``a`` against ``b`` and record the row."""
        max_abs, rel = errors(a, b)
        row = Comparison(group, name, pair, max_abs, rel, metric, bound)
        self.rows.append(row)
        return row

    def add_trees(
        self,
        group: str,
        pair: str,
        a: Mapping[str, object],
        b: Mapping[str, object],
        metric: str = "rel",
        bound: float = STEP_RTOL,
    ) -> None:
        """Compare two dicts key by key; different key sets are an error."""
        if set(a) != set(b):
            raise ValueError(
                f"{group} {pair}: key sets differ: only in first {sorted(set(a) - set(b))}, "
                f"only in second {sorted(set(b) - set(a))}"
            )
        for name in sorted(a):
            self.add(group, name, pair, a[name], b[name], metric, bound)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def failures(self) -> list[Comparison]:
        return [row for row in self.rows if not row.ok]

    def worst(self, group: str | None = None) -> Comparison | None:
        """The row with the largest error relative to its bound (optionally within a group)."""
        rows = [r for r in self.rows if group is None or r.group == group]
        if not rows:
            return None
        return max(rows, key=lambda r: r.score)

    def summary_rows(self) -> list[dict]:
        """One row per (group, pair): the worst tensor of that group, for the printed table."""
        keys = list(dict.fromkeys((r.group, r.pair) for r in self.rows))
        out = []
        for group, pair in keys:
            rows = [r for r in self.rows if r.group == group and r.pair == pair]
            worst = max(rows, key=lambda r: r.score)
            out.append(
                {
                    "group": group,
                    "pair": pair,
                    "tensors": len(rows),
                    "worst tensor": worst.name,
                    "max_abs": worst.max_abs,
                    "rel": worst.rel,
                    "bound": f"{worst.metric} <= {worst.bound:.0e}",
                    "floored": sum(r.floored for r in rows),
                    "ok": all(r.ok for r in rows),
                }
            )
        return out

    def to_dataframe(self, summary: bool = True):
        """A pandas DataFrame (summary per group and pair, or every row)."""
        import pandas as pd

        if summary:
            return pd.DataFrame(self.summary_rows())
        return pd.DataFrame(
            [dataclasses.asdict(r) | {"floored": r.floored, "ok": r.ok} for r in self.rows],
        )

    def table(self) -> str:
        """Plain-text summary table, one line per (group, pair)."""
        rows = self.summary_rows()
        header = [
            "group",
            "pair",
            "tensors",
            "worst tensor",
            "max_abs",
            "rel",
            "bound",
            "floored",
            "ok",
        ]
        cells = [
            [
                r["group"],
                r["pair"],
                str(r["tensors"]),
                r["worst tensor"],
                f"{r['max_abs']:.2e}",
                f"{r['rel']:.2e}",
                r["bound"],
                str(r["floored"]),
                "yes" if r["ok"] else "NO",
            ]
            for r in rows
        ]
        widths = [
            max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(header)
        ]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        verdict = "PASS" if self.ok else f"FAIL ({len(self.failures())} tensors over the bar)"
        if any(r.floored for r in self.rows):
            verdict += (
                f" (floored: relative error over the bar but max-abs <= {REL_ABS_FLOOR:.0e}, "
                "round-off on a tensor that is zero in exact arithmetic)"
            )
        lines.append(verdict)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        return self.to_dataframe().to_html(index=False)
