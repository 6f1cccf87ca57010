"""Strict JSON request bodies: what Python's `json` accepts but no client should send is a 422.

Python's decoder takes `NaN` and `Infinity` (and `1e999` becomes inf), keeps lone UTF-16
surrogates (`"\\ud800"`) that no tokenizer or UTF-8 encoder can take, raises ValueError for
integers over 4300 digits and RecursionError for deep nesting. Each of those used to end
as a 500 somewhere downstream. Here they stop at the door, named by their path in the body.

`StrictJSONRoute` makes FastAPI parse bodies this way on a router's routes; FastAPI wraps
what `Request.json` raises in a 400 with the cause attached, and the app's handler answers
with that cause (our 422) in the route's protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from twinserve.errors import ValidationError

# deeper than any body of ours (a chat message's content parts are 4 levels down)
MAX_DEPTH = 32


def decode_json_body(body: bytes) -> Any:
    """The decoded body, or ValidationError naming what is wrong and where."""
    try:
        value = json.loads(body)
    except RecursionError as exc:
        raise ValidationError(f"the JSON body is nested deeper than {MAX_DEPTH} levels") from exc
    except UnicodeDecodeError as exc:
        raise ValidationError("the body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise ValidationError(f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except ValueError as exc:  # int() over sys.get_int_max_str_digits()
        raise ValidationError("the JSON body holds a number too large to parse") from exc
    check_json_value(value)
    return value


def check_json_value(value: Any) -> None:
    """Reject non-finite floats, lone surrogates and nesting deeper than MAX_DEPTH."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise ValidationError(f"the JSON body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _at(path, "must be a finite number (NaN and Infinity are not JSON)")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _at(path, "is not valid Unicode (a lone surrogate escape such as \\ud800)") from exc


def _at(path: tuple[str | int, ...], problem: str) -> ValidationError:
    name = ".".join(str(p) for p in path)
    if not name:
        return ValidationError(f"the body {problem}")
    return ValidationError(f"`{name}` {problem}", param=name)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = decode_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body goes through `decode_json_body`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
