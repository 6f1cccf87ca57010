"""How the LLM's rephrasings become queries."""

from __future__ import annotations

from twinserve.rag.retrieve import parse_rephrasings


def test_list_marks_quotes_blanks_and_repeats_are_dropped() -> None:
    text = '1. How hot should tea water be?\n\n- "Best water temperature for green tea"\nhow hot is tea\n2) how hot is tea\nok\n'
    assert parse_rephrasings(text, "How hot is tea", 5) == [
        "How hot should tea water be?",
        "Best water temperature for green tea",
    ]


def test_at_most_n_are_kept() -> None:
    assert parse_rephrasings("a query\nb query\nc query", "x", 2) == ["a query", "b query"]
