"""Retrieval quality on a question set: hit@k and MRR, plus retrieval (and answer) latency.

A question set is JSONL, one `{"query": …, "expected_source": …}` per line (optional
`"filters"`, as `/search` takes them). A returned chunk is a hit when its `source` is the
expected one or ends with `"/" + expected` — a set written as `"rag.md"` then matches
chunks ingested as `docs/rag.md` without matching `docs/drag.md`. The rank is the first
hit's place in the k chunks returned (1-based); MRR averages 1/rank, a miss counting 0, so
both numbers are "@k": a source found at rank k+1 is a miss. Retrieval runs in this process
through the same `Retriever` the service uses; `--answers` also asks `RagService.answer`
for each question (one at a time, so the latency is the unloaded one, LLM included).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from twinserve.errors import ValidationError
from twinserve.rag.retrieve import Retriever
from twinserve.rag.schemas import FilterValue, ModelRef, RagRequest, Timings
from twinserve.rag.service import RagService


class EvalQuestion(BaseModel):
    """One line of a question set."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=4000)
    expected_source: str = Field(
        ..., min_length=1, description='The source that answers it, e.g. "docs/rag.md" or "rag.md".'
    )
    filters: dict[str, FilterValue] | None = Field(None, description="Metadata to match, as /search.")


class Latency(BaseModel):
    """Milliseconds, linear between closest ranks (numpy's default)."""

    count: int
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, ms: Sequence[float]) -> Latency | None:
        if not ms:
            return None
        values = np.asarray(ms, dtype=float)
        return cls(
            count=len(ms),
            p50=round(float(np.percentile(values, 50)), 2),
            p95=round(float(np.percentile(values, 95)), 2),
            max=round(float(values.max()), 2),
        )


class QuestionResult(BaseModel):
    line: int = Field(description="Its line in the question set (1-based).")
    query: str
    expected_source: str
    rank: int | None = Field(description="Place of the first matching chunk (1-based); None: not in the k.")
    sources: list[str] = Field(description="The sources returned, best first.")
    retrieval_ms: float
    answer_ms: float | None = None
    answer: str | None = None


class EvalReport(BaseModel):
    """What `twinserve rag eval --json` prints: the summary first, each question after."""

    questions: int
    k: int
    collection: str
    rerank: bool
    hits: int
    hit_at_k: float = Field(description="Share of questions whose expected source is in the k returned.")
    mrr: float = Field(description="Mean of 1/rank over the questions, a miss counting 0.")
    retrieval_ms: Latency
    answer_ms: Latency | None = Field(None, description="With --answers: RagService.answer, end to end.")
    model: ModelRef | None = Field(None, description="With --answers: the model that answered.")
    results: list[QuestionResult]


# ------------------------------------------------------------------ the question set
def load_questions(path: Path) -> list[tuple[int, EvalQuestion]]:
    """(line number, question) for each non-blank line; a bad line is a ValidationError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path}: cannot read the question set ({exc})") from exc
    questions: list[tuple[int, EvalQuestion]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            questions.append((n, EvalQuestion.model_validate(json.loads(line))))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        except PydanticValidationError as exc:
            raise ValidationError(f"{path}:{n}: {_problems(exc)}") from exc
    if not questions:
        raise ValidationError(f"{path}: no questions")
    return questions


def _problems(exc: PydanticValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'line'}: {err['msg']}" for err in exc.errors()
    )


# ------------------------------------------------------------------ the maths
def matches(source: str, expected: str) -> bool:
    return source == expected or source.endswith("/" + expected)


def rank_of(sources: Sequence[str], expected: str) -> int | None:
    """The 1-based place of the first source matching `expected`, None when none does."""
    return next((i for i, source in enumerate(sources, 1) if matches(source, expected)), None)


def hit_rate(ranks: Sequence[int | None]) -> float:
    return sum(r is not None for r in ranks) / len(ranks) if ranks else 0.0


def mean_reciprocal_rank(ranks: Sequence[int | None]) -> float:
    return sum(1 / r for r in ranks if r is not None) / len(ranks) if ranks else 0.0


def summarize(
    results: Sequence[QuestionResult],
    *,
    k: int,
    collection: str,
    rerank: bool,
    model: ModelRef | None = None,
) -> EvalReport:
    ranks = [r.rank for r in results]
    answers = [r.answer_ms for r in results if r.answer_ms is not None]
    retrieval = Latency.of([r.retrieval_ms for r in results])
    if retrieval is None:
        raise ValueError("no results to summarize")
    return EvalReport(
        questions=len(results),
        k=k,
        collection=collection,
        rerank=rerank,
        hits=sum(r is not None for r in ranks),
        hit_at_k=hit_rate(ranks),
        mrr=mean_reciprocal_rank(ranks),
        retrieval_ms=retrieval,
        answer_ms=Latency.of(answers),
        model=model,
        results=list(results),
    )


# ------------------------------------------------------------------ running
async def run_eval(
    questions: Sequence[tuple[int, EvalQuestion]],
    retriever: Retriever,
    *,
    k: int = 4,
    rerank: bool = True,
    service: RagService | None = None,
    max_new_tokens: int = 128,
    on_result: Callable[[QuestionResult], None] | None = None,
) -> EvalReport:
    """Each question in turn: retrieve k chunks (and, given a service, answer it)."""
    results: list[QuestionResult] = []
    for line, question in questions:
        timings = Timings()
        found = await retriever.retrieve(question.query, k, timings, filters=question.filters, rerank=rerank)
        sources = [hit.source for hit in found.hits]
        result = QuestionResult(
            line=line,
            query=question.query,
            expected_source=question.expected_source,
            rank=rank_of(sources, question.expected_source),
            sources=sources,
            retrieval_ms=timings.retrieval_ms,
        )
        if service is not None:
            request = RagRequest(
                query=question.query,
                k=k,
                filters=question.filters,
                rerank=rerank,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
            )
            started = time.perf_counter()
            answer = await service.answer(request)
            result.answer_ms = round((time.perf_counter() - started) * 1000, 2)
            result.answer = answer.answer
        results.append(result)
        if on_result is not None:
            on_result(result)
    model = (await service.model())[0] if service is not None else None
    return summarize(results, k=k, collection=retriever.collection, rerank=rerank, model=model)
