"""SageMaker's container contract: `POST /invocations` takes any of our three bodies.

`{"inputs", "parameters"}` is answered like TGI's `/` (a one-element list, the shape
the Hugging Face LLM DLC returns); `{"messages"}` like `/v1/chat/completions`;
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
from twinserve.server.errors import describe_validation_errors
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi
from twinserve.server.routes import openai as openai_routes
from twinserve.server.routes import tgi as tgi_routes

router = APIRouter(tags=["sagemaker"], dependencies=[Depends(check_api_key)])


@router.post("/invocations")
async def invocations(request: Request, body: dict[str, Any] = Body(...)) -> Response:
    """Dispatch on the body's shape: `inputs` (TGI), `messages` (chat) or `prompt` (completion)."""
    if "messages" in body:
        request.state.wire = "openai"
        return await openai_routes.handle_chat(_parse(oai.ChatCompletionRequest, body), request)
    if "prompt" in body:
        request.state.wire = "openai"
        return await openai_routes.handle_completion(_parse(oai.CompletionRequest, body), request)
    if "inputs" in body:
        return await tgi_routes.compat_generate(_parse(tgi.GenerateRequest, body), request)
    raise ValidationError("the body needs `inputs` (TGI), `messages` (chat) or `prompt` (completion)")


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except PydanticValidationError as exc:
        raise ValidationError(describe_validation_errors(exc.errors())) from exc
