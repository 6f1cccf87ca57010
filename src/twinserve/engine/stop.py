"""Find stop strings in streamed text without ever showing part of one.

A stop string can span many tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUser", ":"), so
the matcher keeps back the longest tail of the pending text that could still grow into a
stop string and releases it once it cannot. On a match the text before the stop string is
released and the stop string itself is dropped (OpenAI / vLLM semantics) or, with
`include_stop`, released too (TGI's semantics, vLLM's `include_stop_str_in_output`); text
after it is dropped either way, so the streamed text always equals the final `generated_text`.
"""

from __future__ import annotations


class StopSequenceMatcher:
    """Per-request stop-string state: feed text deltas, get the text that is safe to emit."""

    def __init__(self, stop: list[str], *, include_stop: bool = False) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._include_stop = include_stop
        self._pending = ""
        self.matched_stop: str | None = None
        """The stop string that ended generation, once one has."""

    @property
    def finished(self) -> bool:
        """Whether a stop string was found (later input is ignored)."""
        return self.matched_stop is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Append `delta`; return (text now safe to emit, whether a stop string matched)."""
        if self.matched_stop is not None:
            return "", True
        if not self._stops:
            return delta, False
        text = self._pending + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched_stop = stop
            self._pending = ""
            return text[: start + len(stop) if self._include_stop else start], True
        keep = self._held_back_len(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text when generation ends for another reason."""
        text, self._pending = self._pending, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        # The stop string that *ends* first wins, as if text came one character at a time,
        # so the result does not depend on how the text was cut into deltas; on a tie the
        # longer one (it starts earlier).
        best: tuple[int, str] | None = None
        for stop in self._stops:
            i = text.find(stop)
            if i < 0:
                continue
            if best is None or (i + len(stop), i) < (best[0] + len(best[1]), best[0]):
                best = (i, stop)
        return best

    def _held_back_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        return keep
