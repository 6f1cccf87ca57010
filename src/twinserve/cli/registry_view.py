"""Rich rendering for `twinserve registry …`: tables, a version's details, import progress."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from twinserve.registry.store import ModelRegistry
    from twinserve.registry.versions import AliasMove, ModelSummary, VersionInfo


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())) or "—"


def _limits(max_input: int | None, max_total: int | None) -> str:
    if max_input is None and max_total is None:
        return "—"
    return f"max_input_tokens={max_input or '—'}, max_total_tokens={max_total or '—'}"


def models_table(models: list[ModelSummary]) -> Table:
    table = Table(title="Registered models", title_justify="left")
    for column in ("name", "latest", "aliases", "updated"):
        table.add_column(column)
    for m in models:
        aliases = ", ".join(f"{a} → {v}" for a, v in sorted(m.aliases.items())) or "—"
        table.add_row(m.name, str(m.latest_version or "—"), aliases, _when(m.updated))
    return table


def versions_table(name: str, versions: list[VersionInfo]) -> Table:
    table = Table(title=f"{name}: {len(versions)} version(s)", title_justify="left")
    for column in ("version", "aliases", "metrics", "card", "created", "sha256", "storage"):
        table.add_column(column, overflow="fold")
    for v in versions:
        table.add_row(
            str(v.version),
            ", ".join(v.aliases) or "—",
            _metrics(v.metrics),
            v.card.summary(),
            _when(v.created),
            v.content_sha256[:12],
            v.storage.value,
        )
    return table


def version_details(v: VersionInfo) -> Table:
    table = Table(title=v.uri, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    card = v.card
    defaults = card.generation_defaults.model_dump(exclude_none=True)
    rows = {
        "aliases": ", ".join(v.aliases) or "—",
        "created": _when(v.created),
        "content sha256": v.content_sha256,
        "storage": f"{v.storage.value}: {v.source}",
        "origin": v.origin or "—",
        "files": f"{len(v.manifest.files)} ({v.manifest.total_bytes / 1e6:.1f} MB)",
        "metrics": _metrics(v.metrics),
        "base model": card.base_model or "—",
        "dataset": card.dataset or "—",
        "training run": card.training_run or "—",
        "prompt template": card.template_label(),
        "generation defaults": ", ".join(f"{k}={val}" for k, val in defaults.items()) or "—",
        "limits": _limits(card.max_input_tokens, card.max_total_tokens),
        "quantization": card.quantization or "—",
        "license": card.license or "—",
        "card tags": ", ".join(f"{k}={val}" for k, val in card.tags.items()) or "—",
        "version tags": ", ".join(f"{k}={val}" for k, val in v.tags.items()) or "—",
    }
    for field, value in rows.items():
        table.add_row(field, value)
    return table


def history_table(name: str, moves: list[AliasMove]) -> Table:
    table = Table(title=f"{name}: alias history", title_justify="left")
    for column in ("when", "alias", "from", "to", "who", "reason"):
        table.add_column(column, overflow="fold")
    for m in moves:
        table.add_row(
            _when(m.time),
            m.alias,
            str(m.from_version) if m.from_version is not None else "—",
            str(m.to_version) if m.to_version is not None else "(deleted)",
            m.user,
            m.reason or "",
        )
    return table


@contextlib.contextmanager
def import_progress(console: Console, enabled: bool = True) -> Iterator[ImportProgress | None]:
    """A rich progress display fed by the registry's `(phase, done, total)` callback."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        yield ImportProgress(bar)


class ImportProgress:
    """One bar per phase; a phase's bar completes when the next one starts.

    Phases with a byte total (hashing, copying, verifying) show sizes; the others (a step
    that is done or not) show none.
    """

    def __init__(self, bar: Progress) -> None:
        self._bar = bar
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self._tasks.get(phase)
        if task is None:
            for other in self._tasks.values():
                self._bar.update(other, completed=self._bar.tasks[other].total)
            task = self._tasks[phase] = self._bar.add_task(phase, total=max(total, 1), detail="")
        detail = f"{decimal(done)} / {decimal(total)}" if total > 1 else ""
        self._bar.update(task, completed=done, total=max(total, 1), detail=detail)


def registry_label(registry: ModelRegistry) -> str:
    from twinserve.registry.backend import redact

    return redact(registry.location.uri)
