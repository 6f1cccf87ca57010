"""Tests that need a system tool (PostgreSQL, redis-server): skipped where it is missing, except
in CI (`CI=true`), where `.ci/run` installs it, so a missing tool is a broken setup, not a skip."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def missing_tool(reason: str) -> NoReturn:
    """Fail under CI=true, skip (with `reason`) elsewhere."""
    if in_ci():
        pytest.fail(f"{reason}; CI=true and .ci/run installs it, so the tests may not skip", pytrace=False)
    pytest.skip(f"{reason} (.ci/run installs it; under CI=true this fails)")
