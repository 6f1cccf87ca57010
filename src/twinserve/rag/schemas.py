"""The RAG service's wire types: what `/rag` and `/search` take and answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# a metadata filter value: one value to match exactly, or a list (any of them)
FilterValue = str | int | bool | list[str] | list[int]


class _Strict(BaseModel):
    """A misspelled field is a 422 naming it, not a silently ignored option."""

    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    """Retrieval only; every optional step can be switched off."""

    query: str = Field(..., min_length=1, max_length=4000)
    k: int = Field(4, ge=1, le=50, description="How many chunks to return.")
    filters: dict[str, FilterValue] | None = Field(
        None, description='Metadata to match, e.g. {"author": "ana"}; a list matches any of its values.'
    )
    expand: int = Field(0, ge=0, le=5, description="Rephrasings the LLM adds to the query (0: off).")
    rerank: bool = Field(True, description="Cross-encoder when configured, else MMR (drops near-duplicates).")


class RagRequest(SearchRequest):
    """A question to answer from the collection."""

    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy.")
    stream: bool = Field(False, description="Server-sent events: sources, then tokens, then done.")
    return_prompt: bool = Field(False, description="Also answer the messages sent to the LLM.")


class Source(BaseModel):
    """One chunk the answer may draw on, numbered in the prompt as `[n]` by its place in the list."""

    id: str
    source: str
    title: str
    score: float
    text: str
    position: int
    metadata: dict[str, Any] = Field(default_factory=dict)


class Timings(BaseModel):
    """Milliseconds per step; None for a step that did not run."""

    expand_ms: float | None = None
    embed_ms: float | None = None
    search_ms: float | None = None
    rerank_ms: float | None = None
    retrieval_ms: float = 0.0
    prompt_ms: float | None = None
    llm_ms: float | None = None
    total_ms: float = 0.0


class SearchResponse(BaseModel):
    sources: list[Source]
    queries: list[str] = Field(description="The query, then its rephrasings (when expanded).")
    timings: Timings


class ModelRef(BaseModel):
    """The model that answered: its registry name and version where it has one."""

    name: str
    version: str | None = None


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    context_chunks: int = Field(0, description="Chunks that fitted in the prompt (the sources).")
    dropped_chunks: int = Field(0, description="Retrieved chunks left out to fit the model's limit.")
    truncated_chunks: int = Field(0, description="Chunks cut short to fit (at most one).")


class RagResponse(BaseModel):
    answer: str
    sources: list[Source]
    model: ModelRef
    usage: Usage
    timings: Timings
    finish_reason: str | None = None
    request_id: str | None = None
    prompt: list[dict[str, str]] | None = Field(None, description="With return_prompt: the messages sent.")


class ErrorBody(BaseModel):
    """Every error answer: TGI's `error` + `error_type`, and what the LLM said when it failed."""

    error: str
    error_type: str
    request_id: str | None = None
    llm: dict[str, Any] | None = Field(
        None, description="On 424: the LLM's status, error_type and message, as it answered them."
    )
