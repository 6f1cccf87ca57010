from __future__ import annotations

import json
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from twinserve.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "héllo wörld 日本語 🙂",
    "the quick brown fox jumps over the lazy dog",
    "naïve café déjà vu, crème brûlée",
    "hello hello world, hello there",
] * 5

TEXTS = [
    "héllo wörld 日本語 🙂",
    " leading space and  double  spaces ",
    "emoji 🙂🙃👍🏽 and flags 🇫🇷 zwj 👩‍👩‍👧",
    "日本語のテキスト, 中文, 한국어",
    "naïve café déjà vu — “quotes” ½",
    "hello world the quick fox",
    "tabs\tand\nnewlines\n\n",
]


def _train_bytelevel() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (like SmolLM2): one character may span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>")


def _train_metaspace_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A "▁"-word BPE vocabulary plus the 256 <0xNN> byte-fallback pieces (sentencepiece-like)."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Leave CJK and emoji out so that they go through byte fallback.
    base.train_from_iterator([c for c in CORPUS if "日" not in c], trainer)
    spec = json.loads(base.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return vocab, [tuple(m) for m in spec["model"]["merges"]]


def _llama() -> Any:
    """Llama-2 style: Metaspace pre-tokenizer, decoder Replace/ByteFallback/Fuse/Strip."""
    vocab, merges = _train_metaspace_vocab()
    return LlamaTokenizer(vocab=vocab, merges=merges)


def _metaspace_decoder() -> PreTrainedTokenizerFast:
    """T5/Mistral-ish: the Metaspace decoder drops the first token's "▁" itself."""
    vocab, merges = _train_metaspace_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class _SlowTokenizer:
    """A tokenizer without a Rust backend: exercises the `tokenizer.decode` path."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.all_special_ids = inner.all_special_ids

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self._inner.decode(ids, **kwargs))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._inner.encode(text, add_special_tokens=add_special_tokens))

    def __len__(self) -> int:
        return len(self._inner)


@pytest.fixture(scope="module")
def bytelevel() -> PreTrainedTokenizerFast:
    return _train_bytelevel()


@pytest.fixture(scope="module", params=["bytelevel", "llama", "metaspace", "slow"])
def any_tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "bytelevel":
        return _train_bytelevel()
    if request.param == "llama":
        return _llama()
    if request.param == "metaspace":
        return _metaspace_decoder()
    return _SlowTokenizer(_train_bytelevel())


def _stream(
    tok: Any, prompt: list[int], gen: list[int], skip: bool = True
) -> tuple[list[str], str, IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [d.add(i) for i in gen]
    return deltas, d.flush(), d


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("text", TEXTS)
def test_no_prompt_joins_to_decode(any_tokenizer: Any, text: str) -> None:
    ids = _encode(any_tokenizer, text)
    deltas, tail, d = _stream(any_tokenizer, [], ids)
    assert tail == ""  # valid text leaves nothing held back
    assert "".join(deltas) == any_tokenizer.decode(ids, skip_special_tokens=True)
    assert d.text == "".join(deltas)
    assert not any("\ufffd" in x for x in deltas)  # characters come out whole


@pytest.mark.parametrize("text", TEXTS)
def test_with_prompt_continues_prompt_text(any_tokenizer: Any, text: str) -> None:
    prompt = _encode(any_tokenizer, "hello there, the fox")
    gen = _encode(any_tokenizer, " " + text)
    deltas, tail, _ = _stream(any_tokenizer, prompt, gen)
    full = any_tokenizer.decode(prompt + gen, skip_special_tokens=True)
    prompt_text = any_tokenizer.decode(prompt, skip_special_tokens=True)
    assert "".join(deltas) + tail == full[len(prompt_text) :]


def test_bytelevel_with_prompt_equals_plain_decode(bytelevel: Any) -> None:
    prompt = _encode(bytelevel, "héllo 🙂")
    for text in TEXTS:
        gen = _encode(bytelevel, text)
        deltas, tail, _ = _stream(bytelevel, prompt, gen)
        assert "".join(deltas) + tail == bytelevel.decode(gen, skip_special_tokens=True)


def test_sentencepiece_first_token_keeps_its_space() -> None:
    tok = _llama()
    prompt = _encode(tok, "hello")
    gen = _encode(tok, " world")
    assert tok.convert_ids_to_tokens(gen)[0].startswith("▁")
    deltas, _, _ = _stream(tok, prompt, gen)
    assert "".join(deltas) == " world"
    assert tok.decode(gen) == "world"  # the convention the prompt window corrects
    assert "".join(_stream(tok, [], gen)[0]) == "world"  # no prompt: same as decode


def test_multibyte_char_is_held_until_complete(bytelevel: Any) -> None:
    ids = _encode(bytelevel, "🙂")
    assert len(ids) > 1  # the emoji spans several byte tokens in this vocabulary
    deltas, _, _ = _stream(bytelevel, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🙂"


def _byte_fallback_ids(tok: Any) -> set[int]:
    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return set()
    return {i for t, i in backend.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}


def _random_ids(tok: Any, rng: random.Random, n: int) -> list[int]:
    """Random ids; with byte fallback, byte pieces only as whole UTF-8 characters.

    A byte-fallback decoder turns a whole run of byte pieces into U+FFFD once the run is
    invalid UTF-8, rewriting bytes it showed as valid before; a stream cannot take text
    back, so on such garbage (which a trained model does not emit) the two differ.
    """
    byte_ids = _byte_fallback_ids(tok)
    if not byte_ids:
        return [rng.randrange(len(tok)) for _ in range(n)]
    others = [i for i in range(len(tok)) if i not in byte_ids]
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.3:
            ids += _encode(tok, rng.choice("é日🙂ö語👍🏽"))
        else:
            ids.append(rng.choice(others))
    return ids


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_random_ids_join_to_decode(any_tokenizer: Any, skip: bool, with_prompt: bool) -> None:
    rng = random.Random(1234)
    for _ in range(150):
        gen = _random_ids(any_tokenizer, rng, rng.randrange(1, 30))
        prompt = _random_ids(any_tokenizer, rng, rng.randrange(0, 8)) if with_prompt else []
        deltas, tail, d = _stream(any_tokenizer, prompt, gen, skip=skip)
        got = "".join(deltas) + tail
        assert d.text == got
        if not prompt:
            assert got == any_tokenizer.decode(gen, skip_special_tokens=skip)
            continue
        prompt_text = any_tokenizer.decode(prompt, skip_special_tokens=skip)
        if prompt_text.endswith("\ufffd"):
            continue  # the prompt ends inside a character: no clean split to compare against
        full = any_tokenizer.decode(prompt + gen, skip_special_tokens=skip)
        assert got == full[len(prompt_text) :]


def test_special_tokens(bytelevel: Any) -> None:
    eos = bytelevel.convert_tokens_to_ids("<|im_end|>")
    ids = _encode(bytelevel, "hello") + [eos] + _encode(bytelevel, " world")
    skipped, _, _ = _stream(bytelevel, [], ids, skip=True)
    kept, _, _ = _stream(bytelevel, [], ids, skip=False)
    assert "".join(skipped) == "hello world"
    assert "".join(kept) == "hello<|im_end|> world"
    d = IncrementalDetokenizer(bytelevel, [])
    assert d.add(eos) == ""
    assert d.token_text(eos) == "<|im_end|>"
    assert d.is_special(eos) and not d.is_special(ids[0])


def test_token_text_is_single_token_decode(any_tokenizer: Any) -> None:
    d = IncrementalDetokenizer(any_tokenizer, [])
    for i in _encode(any_tokenizer, "héllo wörld 日本語"):
        assert d.token_text(i) == any_tokenizer.decode([i], skip_special_tokens=False)


def test_window_stays_small(bytelevel: Any) -> None:
    ids = _encode(bytelevel, " ".join(TEXTS)) * 20
    d = IncrementalDetokenizer(bytelevel, _encode(bytelevel, "prompt " * 50))
    for i in ids:
        d.add(i)
        assert len(d._ids) <= 80  # O(1) work per token, whatever the length so far
    assert d.text == bytelevel.decode(ids, skip_special_tokens=True)


def test_prompt_ending_inside_a_character(any_tokenizer: Any) -> None:
    ids = _encode(any_tokenizer, "ok 🙂 then more text")
    for cut in range(1, len(ids)):
        prompt, gen = ids[:cut], ids[cut:]
        deltas, tail, _ = _stream(any_tokenizer, prompt, gen)
        got = "".join(deltas) + tail
        full = any_tokenizer.decode(ids, skip_special_tokens=True)
        prompt_text = any_tokenizer.decode(prompt, skip_special_tokens=True)
        # Nothing generated is lost; a character split by the cut comes out whole.
        assert full.endswith(got)
        assert len(got) >= len(full) - len(prompt_text.rstrip("\ufffd"))
