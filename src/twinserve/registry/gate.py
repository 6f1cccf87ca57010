"""The promotion gate: requirements on a version's metrics, and "not worse than the holder".

`rougeL>=0.35` both states a threshold and says which way is better (up); `toxicity<=0.1`
says down is better. `--compare-to champion` reuses that direction: the candidate must be
at least as good as the alias's current holder on every metric a requirement names.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from twinserve.errors import ValidationError

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z_][\w.\-/]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Requirement:
    """One `metric OP value` condition."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Requirement:
        match = _REQUIREMENT.match(text)
        if match is None:
            raise ValidationError(
                f"bad requirement {text!r}: expected METRIC OP NUMBER with OP one of "
                ">=, <=, >, <, ==, != (e.g. 'rougeL>=0.35')"
            )
        value = float(match.group(3))
        if not math.isfinite(value):
            raise ValidationError(f"bad requirement {text!r}: the threshold must be a finite number")
        return cls(match.group(1), match.group(2), value)

    @property
    def higher_is_better(self) -> bool | None:
        """Up for >=/>, down for <=/<, no direction for ==/!=."""
        if self.op in (">=", ">"):
            return True
        if self.op in ("<=", "<"):
            return False
        return None

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


class GateCheck(BaseModel):
    """One line of the gate's verdict."""

    check: str
    passed: bool
    detail: str


class GateResult(BaseModel):
    passed: bool
    checks: list[GateCheck]

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def reason(self) -> str:
        """Why the gate said no, one check per line (empty when it passed)."""
        return "\n".join(f"{c.check}: {c.detail}" for c in self.failures)


def parse_requirements(texts: Sequence[str]) -> list[Requirement]:
    return [Requirement.parse(t) for t in texts]


def evaluate_gate(
    candidate: Mapping[str, float],
    requirements: Sequence[Requirement],
    baseline: Mapping[str, float] | None = None,
    baseline_label: str = "the current holder",
) -> GateResult:
    """Every requirement must hold for `candidate`; with a baseline, no named metric may be worse.

    A metric the candidate lacks fails its check (nothing passes unmeasured). A metric the
    baseline lacks cannot be compared; that check passes and says so.
    """
    checks: list[GateCheck] = []
    for req in requirements:
        value = candidate.get(req.metric)
        if value is None:
            checks.append(GateCheck(check=str(req), passed=False, detail=f"{req.metric} was never logged"))
            continue
        ok = req.holds(value)
        checks.append(GateCheck(check=str(req), passed=ok, detail=f"{req.metric} = {value:g}"))
    if baseline is not None:
        for metric, higher in _directions(requirements).items():
            checks.append(
                _compare(metric, higher, candidate.get(metric), baseline.get(metric), baseline_label)
            )
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def _directions(requirements: Sequence[Requirement]) -> dict[str, bool]:
    directions: dict[str, bool] = {}
    for req in requirements:
        higher = req.higher_is_better
        if higher is None:
            continue
        if directions.get(req.metric, higher) != higher:
            raise ValidationError(f"requirements on {req.metric} disagree on whether higher is better")
        directions[req.metric] = higher
    return directions


def _compare(metric: str, higher: bool, value: float | None, base: float | None, label: str) -> GateCheck:
    name = f"{metric} not worse than {label}"
    if value is None:
        return GateCheck(check=name, passed=False, detail=f"{metric} was never logged for the candidate")
    if base is None:
        return GateCheck(check=name, passed=True, detail=f"{label} has no {metric}; nothing to compare")
    ok = value >= base if higher else value <= base
    relation = "≥" if higher else "≤"
    detail = f"{value:g} {relation} {base:g}" if ok else f"{value:g} is worse than {base:g}"
    return GateCheck(check=name, passed=ok, detail=detail)
