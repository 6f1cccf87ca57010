"""Pydantic's validation errors as one readable `ValidationError`, worded like TGI's.

TGI says "`top_p` must be > 0.0 and < 1.0"; pydantic says "Input should be less than
1". Clients show these messages to people, so each constraint gets TGI's style, with
the dotted path of the field (`parameters.top_p`), which is also OpenAI's `param`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twinserve.errors import ValidationError

_MAX_SHOWN = 5


# the names pydantic gives the branches of a union in an error's location (`content.str`)
_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "json-or-python"})


def field_path(loc: Iterable[Any]) -> str:
    """`("body", "messages", 0, "content", "str")` → `messages.0.content`: FastAPI's `body`
    prefix and pydantic's union-branch names dropped, so the path is the client's field."""
    return ".".join(str(p) for p in loc if p != "body" and not _is_branch(p))


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and (part in _BRANCH_NAMES or "[" in part or "-" in part)


def describe(error: Mapping[str, Any]) -> str:
    """One problem, worded like TGI's validation messages."""
    name = field_path(error.get("loc", ()))
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    subject = f"`{name}`" if name else "the request"
    if kind == "greater_than":
        bound = ctx.get("gt")
        return f"{subject} must be strictly positive" if bound == 0 else f"{subject} must be > {bound}"
    if kind in ("greater_than_equal", "less_than", "less_than_equal"):
        op, key = {
            "greater_than_equal": (">=", "ge"),
            "less_than": ("<", "lt"),
            "less_than_equal": ("<=", "le"),
        }[kind]
        return f"{subject} must be {op} {ctx.get(key)}"
    if kind == "too_long":
        return f"{subject} supports up to {ctx.get('max_length')} items. Given: {ctx.get('actual_length')}"
    if kind == "string_too_long":
        return f"{subject} must be at most {ctx.get('max_length')} characters"
    if kind in ("string_too_short", "too_short"):
        return (
            f"{subject} must not be empty" if ctx.get("min_length") == 1 else f"{subject}: {error.get('msg')}"
        )
    if kind == "finite_number":
        return f"{subject} must be a finite number"
    if kind == "missing":
        return f"{subject} is required"
    if kind == "extra_forbidden":
        return f"{subject} is not a known field"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{subject}: {message}" if name else message


def validation_error(errors: Iterable[Mapping[str, Any]], *, prefix: str = "") -> ValidationError:
    """The ValidationError for pydantic's `errors()`; `param` is the first field at fault.

    `prefix` places the errors of a nested model (`parameters`) at their path in the body.
    """
    listed = list(errors)
    if prefix:
        listed = [{**err, "loc": (prefix, *err.get("loc", ()))} for err in listed]
    message = "; ".join(describe(err) for err in listed[:_MAX_SHOWN]) or "invalid request"
    param = field_path(listed[0].get("loc", ())) if listed else None
    return ValidationError(message, param=param or None)
