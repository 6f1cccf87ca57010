"""SageMaker's container contract: `POST /invocations` takes any of our three bodies.

`{"inputs", "parameters"}` is answered like TGI's `/` (a one-element list, the shape
the Hugging Face LLM DLC returns, with `return_full_text` defaulting to true as there);
`{"messages"}` like `/v1/chat/completions`;
`{"prompt"}` like `/v1/completions`. `"stream": true` streams in each one's format.
`GET /ping` lives with the other health routes.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Body, Depends, Request, Response
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from twinserve.errors import ValidationError
from twinserve.server.auth import check_api_key
from twinserve.server.json_body import StrictJSONRoute
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi
from twinserve.server.protocol.validation import validation_error
from twinserve.server.routes import openai as openai_routes
from twinserve.server.routes import tgi as tgi_routes
from twinserve.server.sse import sse_content

router = APIRouter(tags=["sagemaker"], dependencies=[Depends(check_api_key)], route_class=StrictJSONRoute)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _one_of(*schemas: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": {"anyOf": list(schemas)}}}


@router.post(
    "/invocations",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": _one_of(
                _ref(tgi.GenerateRequest), _ref(oai.ChatCompletionRequest), _ref(oai.CompletionRequest)
            ),
        }
    },
    responses={
        200: {
            "description": "The answer in the body's protocol (TGI's is a one-element list); SSE when streaming",
            "content": {
                **_one_of(
                    {"type": "array", "items": _ref(tgi.GenerateResponse)},
                    _ref(oai.ChatCompletion),
                    _ref(oai.Completion),
                ),
                **sse_content(tgi.StreamResponse)[200]["content"],
            },
        },
        **{
            code: {"model": tgi.ErrorResponse | oai.ErrorResponse}
            for code in (400, 401, 413, 422, 424, 429, 500, 503)
        },
    },
)
async def invocations(request: Request, body: dict[str, Any] = Body(...)) -> Response:
    """Dispatch on the body's shape: `inputs` (TGI), `messages` (chat) or `prompt` (completion)."""
    if "messages" in body:
        openai_routes.use_openai_errors(request)
        return await openai_routes.handle_chat(_parse(oai.ChatCompletionRequest, body), request)
    if "prompt" in body:
        openai_routes.use_openai_errors(request)
        return await openai_routes.handle_completion(_parse(oai.CompletionRequest, body), request)
    if "inputs" in body:
        return await tgi_routes.compat_generate(_parse(tgi.GenerateRequest, body), request)
    raise ValidationError("the body needs `inputs` (TGI), `messages` (chat) or `prompt` (completion)")


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except PydanticValidationError as exc:
        raise validation_error(exc.errors()) from exc
