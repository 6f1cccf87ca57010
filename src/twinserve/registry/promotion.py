"""Moving an alias under a gate (CI/CD promotion), and moving it back (rollback).

`promote` moves the alias only when every requirement holds for the candidate's metrics
and, with `compare_to`, the candidate is not worse than that alias's holder. `rollback`
undoes the last promotion of an alias: it walks the recorded alias history back past
earlier rollbacks, so rolling back twice goes two promotions back, not back and forth.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from twinserve.errors import NotFoundError, ValidationError
from twinserve.registry.gate import GateResult, evaluate_gate, parse_requirements
from twinserve.registry.store import ModelRegistry
from twinserve.registry.versions import AliasMove, VersionInfo

ROLLBACK_REASON = "rollback"


class PromotionResult(BaseModel):
    """The gate's verdict and, when it passed, the alias move it made."""

    name: str
    version: int
    alias: str
    gate: GateResult
    baseline_version: int | None = Field(
        None, description="Holder of `compare_to` the candidate was compared with."
    )
    move: AliasMove | None = Field(None, description="None when the gate failed or on a dry run.")

    @property
    def promoted(self) -> bool:
        return self.move is not None


def promote(
    registry: ModelRegistry,
    name: str,
    version: int,
    alias: str,
    requirements: Sequence[str],
    *,
    compare_to: str | None = None,
    dry_run: bool = False,
) -> PromotionResult:
    """Point `alias` at `name/version` if the gate passes; the result says why or why not."""
    reqs = parse_requirements(requirements)
    if compare_to is not None and not reqs:
        raise ValidationError("--compare-to needs at least one --require naming the metrics to compare")
    candidate = registry.get_version(name, version)
    baseline = None
    label = ""
    if compare_to is not None:
        holder = _holder(registry, name, compare_to)
        if holder is not None and holder.version != version:
            baseline, label = holder, f"{compare_to} (v{holder.version})"
    gate = evaluate_gate(candidate.metrics, reqs, baseline.metrics if baseline else None, label)
    result = PromotionResult(
        name=name,
        version=version,
        alias=alias,
        gate=gate,
        baseline_version=baseline.version if baseline else None,
    )
    if not gate.passed or dry_run:
        return result
    checks = "; ".join(c.check for c in gate.checks) or "no requirements"
    move = registry.set_alias(name, alias, version, reason=f"promote: {checks}")
    return result.model_copy(update={"move": move})


def rollback(registry: ModelRegistry, name: str, alias: str) -> AliasMove:
    """Move `alias` back to the version it held before its last promotion."""
    current = _holder(registry, name, alias)
    if current is None:
        raise NotFoundError(f"{name} has no alias {alias!r} to roll back")
    previous = previous_holder(registry.alias_history(name, alias), current.version)
    if previous is None:
        raise ValidationError(f"{name}@{alias} (v{current.version}) has no earlier holder to roll back to")
    return registry.set_alias(name, alias, previous, reason=f"{ROLLBACK_REASON}: from v{current.version}")


def previous_holder(history: Sequence[AliasMove], current: int) -> int | None:
    """The version before the latest promotion that put `current` in place (rollbacks skipped)."""
    for move in reversed(history):
        if move.to_version == current and not (move.reason or "").startswith(ROLLBACK_REASON):
            return move.from_version
    return None


def _holder(registry: ModelRegistry, name: str, alias: str) -> VersionInfo | None:
    try:
        return registry.get_version(name, alias=alias)
    except NotFoundError:
        return None
