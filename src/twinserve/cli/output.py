"""Where the CLI writes: results on stdout, progress and errors on stderr; one way to fail."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (1 an operation failed, 2 bad input)."""
    # escaped: messages hold brackets that are not markup (`pip install 'twinserve[ray]'`, JSONPath)
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
