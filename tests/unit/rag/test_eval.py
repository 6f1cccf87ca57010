"""`rag eval` on real parts (Qdrant local mode, the bundled MiniLM): a corpus with known answers →
exact hit@k and MRR; the question-set parser; the CLI (JSON report, table, bad lines, --answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.servers import serve_config, thread_server
from twinserve.cli.rag_eval import eval_command
from twinserve.errors import ValidationError
from twinserve.rag.embed import Embedder
from twinserve.rag.eval import (
    EvalQuestion,
    QuestionResult,
    load_questions,
    matches,
    mean_reciprocal_rank,
    rank_of,
    run_eval,
    summarize,
)
from twinserve.rag.ingest import Ingestor
from twinserve.rag.retrieve import Retriever
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore

# one short file per topic: one chunk each; cats and kittens are close, the rest far apart
CORPUS = {
    "cats.md": "# Cats\n\nCats purr when they are content and knead soft blankets with their paws.",
    "kittens.md": "# Kittens\n\nKittens are young cats; they purr, play and sleep most of the day.",
    "volcanoes.md": "# Volcanoes\n\nA volcano erupts when magma rises through the crust as lava and ash.",
    "bananas.md": "# Bananas\n\nBananas are yellow fruit that grow in tropical climates and are rich in potassium.",
}
QUESTIONS = [
    # rank 1: the question is about cats, through the suffix rule ("cats.md" ↔ "corpus/cats.md")
    {"query": "Why do cats purr and knead blankets?", "expected_source": "cats.md"},
    # rank 2: cats.md's own sentence comes first, its near neighbour kittens.md second
    {
        "query": "Cats purr when they are content and knead soft blankets with their paws.",
        "expected_source": "corpus/kittens.md",
    },  # fmt: skip
    # not found: no such source in the corpus
    {"query": "How does lava come out of a volcano?", "expected_source": "corpus/geysers.md"},
]


@pytest.fixture
def ingested(tmp_path: Path, rag_settings: RagSettings, embedder: Embedder) -> RagSettings:
    """CORPUS ingested into the test's local folder; the store closed again (one opener at a time)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in CORPUS.items():
        (root / name).write_text(text + "\n")
    store = VectorStore(rag_settings)
    try:
        report = Ingestor(rag_settings, embedder, store).ingest([root])
    finally:
        store.close()
    assert report.chunks == len(CORPUS)
    return rag_settings


@pytest.fixture
def questions_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture
def retriever(ingested: RagSettings, embedder: Embedder) -> Iterator[Retriever]:
    store = VectorStore(ingested)
    yield Retriever(embedder, store, ingested.collection)
    store.close()


def test_hit_at_k_and_mrr_on_known_answers(retriever: Retriever, questions_file: Path) -> None:
    report = asyncio.run(run_eval(load_questions(questions_file), retriever, k=2, rerank=False))
    assert [r.rank for r in report.results] == [1, 2, None]
    assert report.results[1].sources == ["corpus/cats.md", "corpus/kittens.md"]
    assert (report.questions, report.hits, report.k, report.rerank) == (3, 2, 2, False)
    assert report.hit_at_k == pytest.approx(2 / 3)
    assert report.mrr == pytest.approx((1 + 0.5 + 0) / 3)
    assert report.retrieval_ms.count == 3 and report.retrieval_ms.p50 > 0
    assert report.answer_ms is None and report.model is None


def test_k_one_turns_the_rank_two_into_a_miss(retriever: Retriever, questions_file: Path) -> None:
    report = asyncio.run(run_eval(load_questions(questions_file), retriever, k=1, rerank=False))
    assert [r.rank for r in report.results] == [1, None, None]
    assert report.mrr == pytest.approx(1 / 3)


def test_filters_restrict_what_is_retrieved(retriever: Retriever) -> None:
    only_kittens = EvalQuestion(
        query=QUESTIONS[1]["query"], expected_source="kittens.md", filters={"source": "corpus/kittens.md"}
    )
    report = asyncio.run(run_eval([(1, only_kittens)], retriever, k=2, rerank=False))
    assert report.results[0].sources == ["corpus/kittens.md"] and report.results[0].rank == 1


def test_matching_is_exact_or_a_whole_path_suffix() -> None:
    assert matches("docs/rag.md", "docs/rag.md") and matches("docs/rag.md", "rag.md")
    assert not matches("docs/drag.md", "rag.md") and not matches("docs/rag.md", "docs")
    assert rank_of(["a/x.md", "a/y.md", "b/y.md"], "y.md") == 2
    assert rank_of(["a/x.md"], "y.md") is None
    assert mean_reciprocal_rank([1, 4, None, 2]) == pytest.approx((1 + 0.25 + 0 + 0.5) / 4)


def test_summary_latency_percentiles() -> None:
    results = [
        QuestionResult(line=i, query="q", expected_source="s", rank=None, sources=[], retrieval_ms=ms)
        for i, ms in enumerate([10.0, 20.0, 30.0, 40.0, 50.0], 1)
    ]
    report = summarize(results, k=4, collection="docs", rerank=True)
    assert (report.retrieval_ms.p50, report.retrieval_ms.p95, report.retrieval_ms.max) == (30.0, 48.0, 50.0)
    assert report.hit_at_k == 0.0 and report.mrr == 0.0


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"query": "a", "expected_source": "x.md"}', "not json"], "questions.jsonl:2: not JSON"),
        (['{"query": "a"}'], "questions.jsonl:1: expected_source: Field required"),
        (['{"query": "", "expected_source": "x.md"}'], "questions.jsonl:1: query:"),
        (['{"query": "a", "expected_source": "x.md", "k": 3}'], "questions.jsonl:1: k: Extra inputs"),
        (["", "   "], "questions.jsonl: no questions"),
    ],
)
def test_a_bad_question_set_names_the_line(tmp_path: Path, lines: list[str], problem: str) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationError) as caught:
        load_questions(path)
    assert problem in caught.value.message


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('\n{"query": "a", "expected_source": "x.md", "filters": {"author": ["ada", "bo"]}}\n')
    [(line, question)] = load_questions(path)
    assert line == 2 and question.filters == {"author": ["ada", "bo"]}


# ------------------------------------------------------------------ the CLI
runner = CliRunner()
cli = typer.Typer()
cli.command("eval")(eval_command)


@cli.callback()
def _group() -> None:
    """A group, so the command is invoked by name as under `twinserve rag`."""


@pytest.fixture
def cli_env(ingested: RagSettings, monkeypatch: pytest.MonkeyPatch) -> RagSettings:
    monkeypatch.setenv("TWINSERVE_RAG_QDRANT_PATH", str(ingested.qdrant_path))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    return ingested


def test_cli_json_report(cli_env: RagSettings, questions_file: Path) -> None:
    result = runner.invoke(cli, ["eval", str(questions_file), "--k", "2", "--no-rerank", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["rank"] for r in report["results"]] == [1, 2, None]
    assert report["hit_at_k"] == pytest.approx(2 / 3) and report["mrr"] == pytest.approx(0.5)
    assert report["collection"] == "docs" and report["answer_ms"] is None


def test_cli_table(cli_env: RagSettings, questions_file: Path) -> None:
    result = runner.invoke(cli, ["eval", str(questions_file), "--k", "2", "--no-rerank"])
    assert result.exit_code == 0, result.output
    assert "hit@2: 0.667 (2/3)   MRR: 0.500" in result.stdout
    assert "miss" in result.stdout and "retrieval ms: p50" in result.stdout


def test_cli_errors(cli_env: RagSettings, questions_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "expected_source": "x.md"}\n{"query": "b"}\n')
    result = runner.invoke(cli, ["eval", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:2: expected_source" in result.output

    result = runner.invoke(cli, ["eval", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 2 and "absent.jsonl: cannot read" in result.output

    result = runner.invoke(cli, ["eval", str(questions_file), "--answers"])
    assert result.exit_code == 2 and "--answers needs --llm" in result.output

    result = runner.invoke(cli, ["eval", str(questions_file), "--llm", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "go with --answers" in result.output

    result = runner.invoke(cli, ["eval", str(questions_file), "--collection", "nope"])
    assert result.exit_code == 1 and "nope" in result.output


def test_cli_answers_through_a_real_llm(
    cli_env: RagSettings, questions_file: Path, tiny_model_dir: Path
) -> None:
    # the tiny model's tokenizer is byte-level: room for the system prompt and two passages
    limits = {"max_input_tokens": 500, "max_total_tokens": 512, "max_batch_prefill_tokens": 1024}
    with thread_server(serve_config(tiny_model_dir, warmup=False, **limits)) as server:
        result = runner.invoke(
            cli,
            ["eval", str(questions_file), "--k", "2", "--no-rerank", "--answers", "--llm", server.url,
             "--max-new-tokens", "4", "--json"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["rank"] for r in report["results"]] == [1, 2, None]  # answering changes no retrieval
    assert report["answer_ms"]["count"] == 3
    assert all(r["answer_ms"] > 0 and isinstance(r["answer"], str) for r in report["results"])
    assert report["model"]["name"]
