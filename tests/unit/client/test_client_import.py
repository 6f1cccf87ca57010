"""The client is light: an app that only calls an endpoint never loads torch or the engine."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, twinserve.client; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
