"""Reading files into documents: every format, titles, sources, metadata, and errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from twinserve.errors import NotFoundError, ValidationError
from twinserve.rag.documents import check_metadata, discover, html_to_text, load_file


def test_markdown_title_text_source_and_metadata(corpus: Path) -> None:
    [doc] = load_file(corpus / "bread.md", corpus, {"author": "ada"})
    assert doc.title == "Baking sourdough bread"
    assert doc.source == "corpus/bread.md"  # relative to the ingest root's parent
    assert doc.file == str((corpus / "bread.md").resolve())
    assert "Dutch oven at 250 degrees" in doc.text and "\n\n" in doc.text
    assert doc.metadata == {"author": "ada"}


def test_markdown_title_skips_code_fences_and_falls_back_to_the_stem(tmp_path: Path) -> None:
    fenced = tmp_path / "notes.md"
    fenced.write_text("```sh\n# not a title\n```\n\nSome text.\n\n# Real title\n")
    assert load_file(fenced, tmp_path, {})[0].title == "Real title"
    plain = tmp_path / "plain.markdown"
    plain.write_text("No heading here.\n")
    assert load_file(plain, tmp_path, {})[0].title == "plain"


def test_text_file_title_is_the_stem_and_crlf_is_normalized(tmp_path: Path) -> None:
    path = tmp_path / "howto.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst line.\r\n\r\nSecond paragraph.\r\n")
    [doc] = load_file(path, tmp_path, {})
    assert doc.title == "howto"
    assert doc.text == "First line.\n\nSecond paragraph.\n"  # BOM and CR gone


def test_html_drops_script_and_style_and_keeps_paragraphs(corpus: Path) -> None:
    [doc] = load_file(corpus / "garden" / "tomatoes.html", corpus, {})
    assert doc.title == "Growing tomatoes"
    assert doc.source == "corpus/garden/tomatoes.html"
    assert "do not index me" not in doc.text and "color: red" not in doc.text
    assert doc.text == (
        "Tomatoes\n\nTomatoes need sun, water and a stake to climb.\n\n"
        "Pinch the side shoots so the plant puts its energy into fruit."
    )


def test_html_entities_inline_tags_tables_pre_and_h1_title() -> None:
    title, text = html_to_text(
        "<body><h1>Fish &amp; chips</h1><p>Hot <b>and</b>\n   crisp&nbsp;food.<br>Next line</p>"
        "<table><tr><td>a</td><td>b</td></tr></table><pre>  keep\n    indent</pre></body>"
    )
    assert title == "Fish & chips"
    assert text.split("\n\n") == [
        "Fish & chips",
        "Hot and crisp food.",
        "Next line",
        "a b",
        "  keep\n    indent",
    ]


def test_pdf_text_layer_and_title(tmp_path: Path, make_pdf: Callable[..., Path]) -> None:
    pdf = make_pdf(
        tmp_path / "manual.pdf",
        [["Chapter one: the engine (core loop).", "It schedules requests."], ["Chapter two: the server."]],
        title="The manual",
    )
    [doc] = load_file(pdf, pdf, {"type": "manual"})
    assert doc.title == "The manual"
    assert doc.source == "manual.pdf"  # a file given directly: relative to its own folder
    assert "Chapter one: the engine (core loop)." in doc.text
    assert "It schedules requests." in doc.text
    first, second = doc.text.split("\n\n")  # pages become paragraphs
    assert "Chapter two: the server." in second and "Chapter two" not in first
    assert doc.metadata == {"type": "manual"}
    untitled = make_pdf(tmp_path / "untitled.pdf", [["Just text."]])
    assert load_file(untitled, tmp_path, {})[0].title == "untitled"


def test_a_broken_pdf_is_a_validation_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    with pytest.raises(ValidationError, match="broken.pdf"):
        load_file(broken, tmp_path, {})


def test_jsonl_one_document_per_line_with_merged_metadata(corpus: Path, tmp_path: Path) -> None:
    docs = load_file(corpus / "posts.jsonl", corpus, {"platform": "blog", "author": "default"})
    assert [d.text for d in docs] == [
        "Qdrant stores vectors and filters them by payload.",
        "Kubernetes schedules containers onto nodes.",
    ]
    assert docs[0].metadata == {"platform": "blog", "author": "ada", "year": 2024}  # the line wins
    assert [d.source for d in docs] == ["corpus/posts.jsonl#1", "corpus/posts.jsonl#2"]
    assert {d.file for d in docs} == {str((corpus / "posts.jsonl").resolve())}

    named = tmp_path / "named.jsonl"
    record = {"text": "Hello.", "metadata": {"source": "https://example.com/a", "title": "A page", "n": 1}}
    named.write_text("\n" + json.dumps(record) + "\n\n")
    [doc] = load_file(named, tmp_path, {})
    assert (doc.source, doc.title, doc.metadata) == ("https://example.com/a", "A page", {"n": 1})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{oops", "not JSON"),
        ('["a list"]', "JSON object"),
        ('{"metadata": {}}', "'text' must be a non-empty string"),
        ('{"text": "x", "metadata": {"tags": ["a", "b"]}}', "must be a string, number or boolean"),
        ('{"text": "x", "metadata": {"a.b": 1}}', "metadata key 'a.b'"),
        ('{"text": "x", "metadata": "author=ada"}', "'metadata' must be an object"),
    ],
)
def test_a_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValidationError, match=problem) as caught:
        load_file(path, tmp_path, {})
    assert f"{path}:2" in caught.value.message


def test_undecodable_and_unreadable_files_name_themselves(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValidationError, match=r"latin\.txt: not UTF-8"):
        load_file(latin, tmp_path, {})
    missing = tmp_path / "gone.md"
    with pytest.raises(ValidationError, match=r"gone\.md: cannot be read"):
        load_file(missing, tmp_path, {})


def test_an_empty_file_has_no_documents(tmp_path: Path) -> None:
    path = tmp_path / "empty.md"
    path.write_text("  \n\n")
    assert load_file(path, tmp_path, {}) == []


def test_discover_walks_folders_sorted_skipping_hidden_and_unsupported(corpus: Path, tmp_path: Path) -> None:
    (corpus / ".git").mkdir()
    (corpus / ".git" / "notes.md").write_text("hidden")
    (corpus / ".draft.md").write_text("hidden")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    (corpus / "UPPER.MD").write_text("# Upper\n")
    found = discover([corpus, corpus / "bread.md"])  # a file named twice is listed once
    root = corpus.resolve()
    assert found == sorted(found)
    assert [f.relative_to(root).as_posix() for f, _ in found] == [
        "UPPER.MD", "bike.txt", "bread.md", "chess.pdf", "garden/tomatoes.html", "posts.jsonl",
    ]  # fmt: skip
    assert {r for _, r in found} == {root}


def test_discover_refuses_missing_paths_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nowhere"):
        discover([tmp_path / "nowhere"])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValidationError, match="unsupported file type .csv"):
        discover([tmp_path / "table.csv"])


def test_metadata_checks() -> None:
    assert check_metadata({"author": "ada", "year": 2024, "draft": False, "none": None}, "x") == {
        "author": "ada",
        "year": 2024,
        "draft": False,
    }
    with pytest.raises(ValidationError, match="reserved"):
        check_metadata({"source": "x"}, "--meta")
    with pytest.raises(ValidationError, match="must match"):
        check_metadata({"has space": 1}, "--meta")
