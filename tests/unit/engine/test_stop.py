from __future__ import annotations

import random

import pytest

from twinserve.engine.stop import StopSequenceMatcher


def _run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, StopSequenceMatcher]:
    m = StopSequenceMatcher(stops)
    out: list[str] = []
    for d in deltas:
        text, matched = m.feed(d)
        out.append(text)
        if matched:
            return out, True, m
    out.append(m.flush())
    return out, False, m


def _expected(stops: list[str], text: str) -> tuple[str, bool]:
    """Reference: read one character at a time, cut at the first stop string to complete."""
    for end in range(len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def test_no_stops_is_passthrough_without_holdback() -> None:
    m = StopSequenceMatcher([])
    for d in ["a", "b", "", "c d"]:
        assert m.feed(d) == (d, False)
    assert m.flush() == ""
    assert m.matched_stop is None


def test_stop_across_token_boundaries() -> None:
    out, matched, m = _run(["\n\nUser:"], ["Hi", " there", "\n", "\nUs", "er", ":", " more"])
    assert matched and m.matched_stop == "\n\nUser:"
    assert out == ["Hi", " there", "", "", "", ""]
    assert "".join(out) == "Hi there"


def test_partial_stop_is_never_leaked_and_released_when_broken() -> None:
    m = StopSequenceMatcher(["STOP"])
    assert m.feed("xS") == ("x", False)
    assert m.feed("TO") == ("", False)
    assert m.feed("P!") == ("", True)
    m = StopSequenceMatcher(["STOP"])
    assert m.feed("xST") == ("x", False)
    assert m.feed("OOP") == ("STOOP", False)  # cannot become "STOP" any more


def test_overlapping_prefix() -> None:
    m = StopSequenceMatcher(["ab"])
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)  # the first "a" cannot start "ab" any more
    assert m.feed("b") == ("", True)
    assert m.matched_stop == "ab"


def test_self_overlapping_stop() -> None:
    out, matched, _ = _run(["aab"], ["a", "a", "a", "b", "c"])
    assert matched and "".join(out) == "a"


def test_multiple_stops_first_to_complete_wins() -> None:
    out, matched, m = _run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert matched and m.matched_stop == "lo w"
    assert "".join(out) == "hel"
    out, matched, m = _run(["</s>", "###"], ["a#", "#", "x</", "s>"])
    assert matched and m.matched_stop == "</s>" and "".join(out) == "a##x"


def test_first_stop_to_complete_wins_regardless_of_chunking() -> None:
    for deltas in (["abcd"], ["abc", "d"], list("abcd")):
        out, matched, m = _run(["abcd", "c"], deltas)
        assert matched and m.matched_stop == "c" and "".join(out) == "ab"
    out, matched, m = _run(["ab", "xab"], ["xa", "b"])
    assert m.matched_stop == "xab" and "".join(out) == ""


def test_stop_at_the_very_start() -> None:
    m = StopSequenceMatcher(["Hello"])
    assert m.feed("Hello there") == ("", True)
    assert m.matched_stop == "Hello"


def test_after_match_everything_is_dropped() -> None:
    m = StopSequenceMatcher(["x"])
    assert m.feed("abxcd") == ("ab", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
    assert m.finished


def test_flush_releases_held_back_text() -> None:
    m = StopSequenceMatcher(["###"])
    assert m.feed("done ##") == ("done ", False)
    assert m.flush() == "##"
    assert m.matched_stop is None


def test_unicode_stops() -> None:
    out, matched, _ = _run(["日本"], ["こんにちは", "日", "本語"])
    assert matched and "".join(out) == "こんにちは"


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice("aab c\n") for _ in range(rng.randrange(0, 30)))
        stops = [
            "".join(rng.choice("ab c\n") for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(0, 5))
        ]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(1, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, matched, m = _run(stops, deltas)
        want, want_matched = _expected(stops, text)
        assert "".join(out) == want
        assert matched == want_matched
        if matched:
            assert m.matched_stop is not None and text.find(m.matched_stop) == len(want)
        # One delta or many: the same result.
        assert "".join(_run(stops, [text])[0]) == want
        # Held back text never contains the beginning of a stop string that later failed.
        emitted = ""
        for piece in out:
            emitted += piece
            assert want.startswith(emitted)


def test_include_stop_keeps_the_stop_string_and_drops_what_follows() -> None:
    m = StopSequenceMatcher(["\nUser:"], include_stop=True)
    assert m.feed("Hi there\nUs") == ("Hi there", False)
    assert m.feed("er: and more") == ("\nUser:", True)
    assert m.feed("later") == ("", True)
