"""Files to documents: find what to ingest under the given paths and read each file's text.

One loader per format, all stdlib except PDF (pypdf's text layer): Markdown and plain text as
they are, HTML with script/style dropped and block elements as paragraph breaks, JSONL as one
document per line (`{"text": …, "metadata": {…}}`). Paragraphs come out separated by a blank
line, which is what the chunker cuts on first.

Bad input (unreadable, not UTF-8, a broken PDF, a bad JSONL line) is a ValidationError naming
the file (and line), so an ingest over a folder says which file to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from twinserve.errors import NotFoundError, ValidationError

SUPPORTED_SUFFIXES = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".jsonl"}
# payload fields of their own; a user metadata key of the same name would shadow them in filters
RESERVED_KEYS = {"text", "file", "file_hash", "source", "title", "position", "metadata"}
# metadata keys become Qdrant payload paths (`metadata.<key>`): no dots, no brackets
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Document:
    """One unit of text to chunk, with where it came from.

    `file` is the ingest unit (the resolved file path: what re-ingest and prune compare);
    `source` is what users see: the path relative to the ingest root's parent
    (`docs/rag.md`), or a JSONL line's `metadata.source`, else `<source>#<line>`.
    """

    file: str
    source: str
    title: str
    text: str
    metadata: dict[str, Any]


def check_metadata(metadata: Mapping[str, Any], where: str) -> dict[str, Any]:
    """User metadata as stored: JSON scalars under plain keys (None values dropped)."""
    clean: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValidationError(
                f"{where}: metadata key {key!r} must match {_KEY.pattern}", param="metadata"
            )
        if key in RESERVED_KEYS:
            raise ValidationError(f"{where}: metadata key {key!r} is reserved", param="metadata")
        if value is None:
            continue
        if not isinstance(value, str | int | float | bool):
            raise ValidationError(
                f"{where}: metadata {key!r} must be a string, number or boolean (got {type(value).__name__})",
                param="metadata",
            )
        clean[key] = value
    return clean


def discover(paths: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Every supported file under `paths` as (file, root), sorted by file, each file once.

    A folder is walked recursively, skipping hidden entries (`.git`, `.venv`) and unsupported
    suffixes; a file named directly must be supported. `root` is the path as given (resolved),
    so `source` can be shown relative to its parent and prune knows which files it covers.
    """
    found: dict[Path, Path] = {}
    for given in paths:
        root = Path(given).expanduser().resolve()
        if not root.exists():
            raise NotFoundError(f"{given}: no such file or folder")
        if root.is_file():
            if root.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ValidationError(
                    f"{given}: unsupported file type {root.suffix or '(none)'}; "
                    f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
                )
            found.setdefault(root, root)
            continue
        for file in root.rglob("*"):
            relative = file.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if file.is_file() and file.suffix.lower() in SUPPORTED_SUFFIXES:
                found.setdefault(file, root)
    return sorted(found.items())


def source_of(file: Path, root: Path) -> str:
    """The path users see: relative to the ingest root's parent, with forward slashes."""
    return file.relative_to(root.parent).as_posix()


def load_file(path: Path, root: Path, meta: Mapping[str, Any]) -> list[Document]:
    """The documents in one file (JSONL gives one per line; others one, or none when empty)."""
    path = path.resolve()
    source = source_of(path, root.resolve())
    metadata = check_metadata(meta, "--meta")
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        title, text = _read_pdf(path)
        return _one(path, source, title, text, metadata)
    raw = _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, source, raw, metadata)
    if suffix in (".html", ".htm"):
        html_title, text = html_to_text(raw)
        return _one(path, source, html_title or path.stem, text, metadata)
    text = _normalize(raw)
    md_title = markdown_title(text) if suffix in (".md", ".markdown") else None
    return _one(path, source, md_title or path.stem, text, metadata)


def _one(path: Path, source: str, title: str, text: str, metadata: dict[str, Any]) -> list[Document]:
    if not text.strip():
        return []
    return [Document(file=str(path), source=source, title=title, text=text, metadata=dict(metadata))]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def markdown_title(text: str) -> str | None:
    """The first `# ` heading outside code fences."""
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("# ") and stripped[2:].strip():
            return stripped[2:].strip().rstrip("#").strip()
    return None


def _read_jsonl(path: Path, source: str, raw: str, meta: dict[str, Any]) -> list[Document]:
    documents = []
    for number, line in enumerate(_normalize(raw).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValidationError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise ValidationError(f"{where}: each line must be a JSON object with a 'text' field")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValidationError(f"{where}: 'text' must be a non-empty string")
        line_meta = record.get("metadata", {})
        if not isinstance(line_meta, dict):
            raise ValidationError(f"{where}: 'metadata' must be an object")
        line_meta = dict(line_meta)
        line_source, line_title = line_meta.pop("source", None), line_meta.pop("title", None)
        metadata = {**meta, **check_metadata(line_meta, where)}
        documents.append(
            Document(
                file=str(path),
                source=str(line_source) if line_source else f"{source}#{number}",
                title=str(line_title) if line_title else path.stem,
                text=_normalize(text),
                metadata=metadata,
            )
        )
    return documents


def _read_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValidationError(f"{path}: the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except OSError as exc:
        raise ValidationError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:  # a damaged file fails deep in the parser
        raise ValidationError(f"{path}: not a readable PDF ({exc})") from exc
    text = "\n\n".join(_normalize(page).strip() for page in pages if page.strip())
    return (str(title).strip() if title and str(title).strip() else path.stem), text


# --- HTML ---------------------------------------------------------------------------------------

_SKIP = {"script", "style", "noscript", "template", "svg", "head"}
_BLOCK = {
    "p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table", "tr",
    "pre", "figure", "figcaption", "form", "hr", "br", "address", "details", "summary",
}  # fmt: skip


class _TextExtractor(HTMLParser):
    """Visible text as paragraphs: block elements end one, whitespace inside collapses (not in <pre>)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.title_parts: list[str] = []
        self.h1: str | None = None
        self._current: list[str] = []
        self._skip_depth = 0
        self._in_title = self._in_h1 = False
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP:
            self._skip_depth += 1
        elif tag in ("td", "th"):
            self._current.append(" ")  # cells of a row stay apart
        elif tag in _BLOCK:
            self._flush()
            self._pre_depth += tag == "pre"
            self._in_h1 = self._in_h1 or tag == "h1"

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK:
            self._flush()
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)
            if tag == "h1":
                self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip_depth:
            self._current.append(data)

    def _flush(self) -> None:
        text = "".join(self._current)
        self._current = []
        text = text.strip("\n") if self._pre_depth else " ".join(text.split())
        if text.strip():
            self.paragraphs.append(text)
            if self._in_h1 and self.h1 is None:
                self.h1 = " ".join(text.split())


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, text) of an HTML page: <title>, else the first <h1>; text in paragraphs."""
    parser = _TextExtractor()
    parser.feed(_normalize(html))
    parser.close()
    parser._flush()
    title = " ".join("".join(parser.title_parts).split()) or parser.h1
    return title or None, "\n\n".join(parser.paragraphs)
