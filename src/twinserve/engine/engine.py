"""The synchronous engine core: admit → schedule → run → update, one step at a time.

Intake is three thread-safe calls: `reserve` (the overload check, so a full engine
answers at once instead of queueing), `validate` (tokenize and check the limits: the
costly part, which AsyncEngine runs on its validation threads) and `enqueue` (hand the
request to the core through an inbox); `add_request` does all three. `step` runs in the
engine thread.

A forward pass that fails is retried row by row, so one request that breaks the model
(or the sampler) fails alone with a 424 and the rest of its batch goes on. A pass in
which every row fails may be the request's fault or the device's; a probe request (a
few tokens every model can run) is queued after it, and only when passes keep failing
with the probes among them is the engine declared dead. So a client re-sending a bad
request cannot kill the engine, and a broken device still does within a few steps.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from twinserve.config import EngineConfig
from twinserve.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from twinserve.engine.prefix_cache import PrefixCache
from twinserve.engine.request import (
    GenerateRequest,
    GenerationDetails,
    RequestStatus,
    SamplingParams,
    Token,
    TokenEvent,
)
from twinserve.engine.runner import Runner, RunnerOutput, SpeculationStats
from twinserve.engine.sampling import SamplingState
from twinserve.engine.scheduler import Scheduler
from twinserve.engine.speculation import PromptLookup
from twinserve.engine.state import RequestState
from twinserve.engine.stop import StopSequenceMatcher
from twinserve.errors import (
    ContextLengthError,
    EngineDeadError,
    ModelError,
    OverloadedError,
    TwinserveError,
    ValidationError,
)

log = logging.getLogger(__name__)

# after this many passes in a row fail for every row (probes included), the engine is dead
MAX_CONSECUTIVE_FAILURES = 3
PROBE_REQUEST_PREFIX = "probe-"
# prompt logprobs (`decoder_input_details`) materialise prompt tokens × vocab logits:
# bounded to 64M values (256 MB in fp32), i.e. ~1,300 tokens for a 49k vocab
MAX_PROMPT_LOGPROB_VALUES = 2**26
# what a client sees of a failed forward pass; the exception itself goes to the log
GENERATION_FAILED = "Request failed during generation"


class Engine:
    """Continuous-batching engine over a `Runner`; all model work happens in `step`."""

    def __init__(
        self,
        config: EngineConfig,
        runner: Runner,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.token_texts = TokenTexts(tokenizer)
        self.scheduler = Scheduler(config)
        self._inbox: queue.SimpleQueue[RequestState] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._by_id: dict[str, RequestState] = {}
        self._in_flight = 0
        self._reserved = 0  # admitted, still validating
        self._lock = threading.Lock()
        self._seeds = random.Random(config.seed)
        self._failures = 0
        self._idle_since: float | None = None  # when the engine last ran out of work
        self._probes = 0
        self._dying = False
        self.emit: Callable[[list[TokenEvent]], None] | None = None
        self.loaded: Any = None  # the LoadedModel, when built by the factory (for /info)

    # ------------------------------------------------------------ intake
    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def num_admitted(self) -> int:
        """Requests counted against max_concurrent_requests: validating, waiting or running."""
        return self._in_flight + self._reserved

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self._in_flight - len(self.scheduler.running)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The runner's cross-request prefix cache (None when it is off)."""
        cache = getattr(self.runner, "prefix", None)
        return cache if isinstance(cache, PrefixCache) else None

    @property
    def speculation(self) -> SpeculationStats | None:
        """Drafted and accepted tokens (None when speculation is off or the runner has none)."""
        stats = getattr(self.runner, "speculation", None)
        return stats if self.config.speculate and isinstance(stats, SpeculationStats) else None

    def tokenize(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            given = list(request.prompt_token_ids)
            vocab = len(self.tokenizer)
            if any(not 0 <= i < vocab for i in given):
                raise ValidationError(f"`prompt_token_ids` must be in [0, {vocab})", param="prompt")
            return given
        assert request.prompt is not None
        ids: list[int] = self.encode(request.prompt, add_special_tokens=request.add_special_tokens)[
            "input_ids"
        ]
        return ids

    def encode(self, text: str, *, add_special_tokens: bool = True, offsets: bool = False) -> Any:
        """The tokenizer's encoding of `text` (with character offsets if asked); ValidationError
        for text it cannot take."""
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
        except (TypeError, ValueError, UnicodeError) as exc:  # e.g. lone surrogates
            raise ValidationError("`inputs` is not valid text for the tokenizer") from exc

    def check_truncate(self, truncate: int | None) -> None:
        limit = self.config.max_input_tokens
        if truncate is not None and truncate > limit:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limit}. Given: {truncate}",
                param="truncate",
            )

    def check_input_length(self, prompt_tokens: int, new_tokens: int) -> None:
        """ContextLengthError (TGI's wording) for a prompt over max_input_tokens."""
        limit = self.config.max_input_tokens
        if prompt_tokens > limit:
            raise ContextLengthError(
                f"`inputs` must have less than {limit} tokens. Given: {prompt_tokens}",
                limit=limit,
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
            )

    def validate(self, request: GenerateRequest) -> RequestState:
        """Tokenize and check the limits; raises ValidationError with TGI's wording."""
        cfg, params = self.config, request.params
        self.check_truncate(params.truncate)
        ids = self.tokenize(request)
        if not ids:
            raise ValidationError("`inputs` cannot be empty")
        if params.truncate is not None and len(ids) > params.truncate:
            ids = ids[-params.truncate :]
        max_new = params.max_new_tokens
        self.check_input_length(len(ids), max_new or 0)
        if max_new is None:
            max_new = cfg.max_total_tokens - len(ids)
        if len(ids) + max_new > cfg.max_total_tokens:
            raise ContextLengthError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`",
                limit=cfg.max_total_tokens,
                prompt_tokens=len(ids),
                new_tokens=max_new,
            )
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValidationError(f"`stop_token_ids` must be in [0, {vocab})", param="stop_token_ids")
        if params.decoder_input_details:
            most = max(1, MAX_PROMPT_LOGPROB_VALUES // max(vocab, 1))
            if len(ids) > most:
                raise ValidationError(
                    f"`decoder_input_details` is limited to prompts of at most {most} tokens on this "
                    f"model. Given: {len(ids)}",
                    param="decoder_input_details",
                )
        seed = params.seed
        if seed is None and params.is_sampling:
            with self._lock:
                seed = self._seeds.randrange(2**63)
        return RequestState(
            request=request,
            prompt_ids=ids,
            max_new_tokens=max_new,
            sampling=SamplingState(params, ids, seed, stop_ids=self._stop_ids(params)),
            seed=seed if params.is_sampling else None,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
            ),
            stop=StopSequenceMatcher(params.stop, include_stop=params.include_stop_str_in_output)
            if params.stop
            else None,
            lookup=PromptLookup(ids) if cfg.speculate and not params.is_sampling else None,
        )

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """Tokens that end generation: EOS (unless ignored) and the request's stop token ids."""
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return eos | frozenset(params.stop_token_ids)

    def reserve(self) -> None:
        """Count a request in (validating, then queued); OverloadedError at once when full."""
        with self._lock:
            busy = self._in_flight + self._reserved
            if busy >= self.config.max_concurrent_requests:
                raise OverloadedError(
                    f"Model is overloaded: {busy} requests in flight "
                    f"(max_concurrent_requests={self.config.max_concurrent_requests})"
                )
            self._reserved += 1

    def unreserve(self) -> None:
        """Give back a reservation whose request failed validation."""
        with self._lock:
            self._reserved -= 1

    def enqueue(self, state: RequestState) -> None:
        """Hand a validated request to the core; uses up the caller's reservation either way."""
        rid = state.request_id
        with self._lock:
            self._reserved -= 1
            if rid in self._by_id:
                raise ValidationError(f"duplicate request id {rid!r}")
            self._in_flight += 1
            self._by_id[rid] = state
        self._inbox.put(state)

    def add_request(self, request: GenerateRequest) -> RequestState:
        """Reserve, validate and enqueue in the caller's thread."""
        self.reserve()
        try:
            state = self.validate(request)
        except BaseException:
            self.unreserve()
            raise
        self.enqueue(state)
        return state

    def abort_request(self, request_id: str) -> None:
        """Thread-safe; the request leaves the batch at the start of the next step."""
        self._aborts.put(request_id)

    def has_work(self) -> bool:
        return self._in_flight > 0 or not self._inbox.empty() or not self._aborts.empty()

    # -------------------------------------------------------------- step
    def step(self) -> list[TokenEvent]:
        """Run one iteration; returns the events of this step (also sent to `emit`)."""
        self._drain_inbox()
        events: list[TokenEvent] = []
        sched = self.scheduler.schedule(self.runner.cached_prefix_len)
        if sched.is_empty:
            self.release_if_idle()
            return events
        try:
            self.runner.prepare_cache(sched.cache_slots, sched.cache_capacity, len(self.scheduler.running))
        except Exception as exc:  # e.g. out of memory: fail this step's rows like a failed forward
            return self._forward_failed(sched.decode + sched.prefill, exc, prefill=bool(sched.prefill))
        # newcomers first (TGI's order): their first token does not wait for a decode pass;
        # running streams wait for the bounded prefill either way. A row finishing at prefill
        # only ever moves a row prefilled in this same pass (they sit after the decode rows).
        if sched.prefill:
            events += self._run(sched.prefill, prefill=True)
        if sched.decode:
            events += self._run(sched.decode, prefill=False)
        self.release_if_idle()
        return events

    def release_if_idle(self) -> None:
        """Free the slot KV cache once the engine has had no work for `kv_cache_idle_release_s`
        (the engine thread calls this while it waits for work)."""
        if self.has_work() or self.scheduler.has_work():
            self._idle_since = None
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since >= self.config.kv_cache_idle_release_s:
            self.runner.release_cache()

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get())
        while not self._aborts.empty():
            rid = self._aborts.get()
            state = self._by_id.get(rid)
            if state is not None and not state.status.is_finished:
                self._finish(state, RequestStatus.FINISHED_ABORTED)

    def _run(self, rows: list[RequestState], *, prefill: bool) -> list[TokenEvent]:
        try:
            output = self.runner.execute(rows, prefill=prefill)
        except Exception as exc:
            if len(rows) == 1:
                return self._forward_failed(rows, exc, prefill=prefill)
            log.warning(
                "forward pass failed for %d rows (prefill=%s): %s; retrying row by row",
                len(rows),
                prefill,
                exc,
            )
            return self._run_rows_alone(rows, prefill=prefill)
        self._failures = 0
        events = self._update(rows, output, prefill=prefill)
        self._emit(events)
        return events

    def _run_rows_alone(self, rows: list[RequestState], *, prefill: bool) -> list[TokenEvent]:
        """Each row in a pass of its own, so only the rows that fail alone fail."""
        ok: list[RequestState] = []
        outputs: list[RunnerOutput] = []
        failed: list[tuple[RequestState, Exception]] = []
        for row in rows:
            try:
                outputs.append(self.runner.execute([row], prefill=prefill))
                ok.append(row)
            except Exception as exc:
                failed.append((row, exc))
        if not ok:
            return self._forward_failed(rows, failed[0][1], prefill=prefill)
        self._failures = 0
        events = self._update(ok, RunnerOutput.concat(outputs), prefill=prefill)
        for row, cause in failed:
            log.error(
                "forward pass failed for one request (prefill=%s)",
                prefill,
                extra={"engine_request_id": row.request_id},
                exc_info=cause,
            )
            events.append(self._fail(row, ModelError(GENERATION_FAILED)))
        self._emit(events)
        return events

    def _forward_failed(self, rows: list[RequestState], exc: Exception, *, prefill: bool) -> list[TokenEvent]:
        self._failures += 1
        log.error("forward pass failed (%d rows, prefill=%s)", len(rows), prefill, exc_info=exc)
        events = [self._fail(r, ModelError(GENERATION_FAILED)) for r in rows]
        self._emit(events)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            raise EngineDeadError(f"{self._failures} forward passes failed in a row: {exc!r}") from exc
        self._queue_probe()
        return events

    def _queue_probe(self) -> None:
        """A request every model can serve, to tell a bad request from a broken device."""
        self._probes += 1
        with contextlib.suppress(OverloadedError):  # a full engine gets real passes soon enough
            self.add_request(probe_request(self, f"{PROBE_REQUEST_PREFIX}{self._probes}"))

    def _emit(self, events: list[TokenEvent]) -> None:
        if self.emit is not None and events:
            self.emit(events)

    # ------------------------------------------------------------ update
    def _update(self, rows: list[RequestState], out: RunnerOutput, *, prefill: bool) -> list[TokenEvent]:
        now = time.monotonic()
        # cached lengths first: finishing a row moves another row's slot, and the move
        # must copy the positions this step just wrote (accepted drafts included)
        for i, state in enumerate(rows):
            if prefill:
                state.num_cached = state.prompt_len
                state.first_token_time = now
                logprobs = out.prompt_logprobs[i] if out.prompt_logprobs else None
                if logprobs is not None:
                    state.prefill_tokens = self._prefill_tokens(state, logprobs)
            else:
                state.num_cached += 1 + len(out.accepted_of(i))
        events: list[TokenEvent] = []
        for i, state in enumerate(rows):
            event = self._append_token(state, out.token_ids[i], out.logprobs[i], out.top_tokens[i])
            events.append(event)
            for extra in out.accepted_of(i):  # drafts the model agreed with, until the row ends
                if event.finished:
                    break
                event = self._append_token(state, extra.id, extra.logprob, extra.top)
                events.append(event)
        return events

    def _prefill_tokens(self, state: RequestState, logprobs: list[float]) -> list[Token]:
        return [self._token(t, None if j == 0 else logprobs[j - 1]) for j, t in enumerate(state.prompt_ids)]

    def _token(self, token_id: int, logprob: float | None) -> Token:
        texts = self.token_texts
        return Token(
            id=token_id, text=texts.text(token_id), logprob=logprob, special=texts.is_special(token_id)
        )

    def _append_token(
        self, state: RequestState, tid: int, logprob: float, alternatives: list[tuple[int, float]]
    ) -> TokenEvent:
        state.output_ids.append(tid)
        state.sampling.append(tid)
        if state.lookup is not None:
            state.lookup.append(tid)
        token = self._token(tid, logprob)
        top = [self._token(t, lp) for t, lp in alternatives]
        state.tokens.append(token)
        state.top_tokens.append(top)
        assert state.detokenizer is not None
        delta = state.detokenizer.add(tid)
        status: RequestStatus | None = None
        params = state.request.params
        may_stop = len(state.output_ids) > params.min_tokens
        if may_stop and tid in state.sampling.stop_ids:
            status = (
                RequestStatus.FINISHED_STOP
                if tid in params.stop_token_ids and tid not in self.eos_token_ids
                else RequestStatus.FINISHED_EOS
            )
        if state.stop is not None and may_stop:
            delta, matched = state.stop.feed(delta)
            if matched and status is None:
                status = RequestStatus.FINISHED_STOP
        if status is None and len(state.output_ids) >= state.max_new_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None and status is not RequestStatus.FINISHED_STOP:
            delta += state.detokenizer.flush()
            if state.stop is not None:
                delta += state.stop.flush()
        state.text_parts.append(delta)
        if status is None:
            return TokenEvent(request_id=state.request_id, token=token, text=delta, top_tokens=top)
        return self._finish(state, status, token=token, text=delta, top=top)

    def _finish(
        self,
        state: RequestState,
        status: RequestStatus,
        *,
        token: Token | None = None,
        text: str = "",
        top: list[Token] | None = None,
        error: TwinserveError | None = None,
    ) -> TokenEvent:
        state.status = status
        state.finish_time = time.monotonic()
        if not self._dying:
            self.runner.retain(state)  # before its slot is handed to another request (not KV of an error)
        move = self.scheduler.remove(state)
        if move is not None and not self._dying:
            self.runner.move_slot(move)
        with self._lock:
            self._by_id.pop(state.request_id, None)
            self._in_flight -= 1
        reason = status.finish_reason
        generated = "".join(state.text_parts)
        if state.request.params.return_full_text and state.request.prompt is not None:
            generated = state.request.prompt + generated
        details = None
        if reason is not None:
            details = GenerationDetails(
                finish_reason=reason,
                generated_tokens=len(state.output_ids),
                seed=state.seed,
                prefill=state.prefill_tokens,
                tokens=state.tokens,
                top_tokens=state.top_tokens,
                prompt_tokens=state.prompt_len,
                cached_tokens=state.cached_tokens,
            )
        scheduled = state.scheduled_time or state.finish_time
        return TokenEvent(
            request_id=state.request_id,
            token=token,
            text=text,
            top_tokens=top or [],
            finished=True,
            finish_reason=reason,
            generated_text=generated if reason is not None else None,
            details=details,
            error=error,
            queue_time=scheduled - state.request.arrival_time,
            inference_time=state.finish_time - scheduled,
        )

    def _fail(self, state: RequestState, error: TwinserveError) -> TokenEvent:
        return self._finish(state, RequestStatus.FINISHED_ERROR, error=error)

    def fail_all(self, error: TwinserveError) -> list[TokenEvent]:
        """Fail everything in flight (the engine is going down; the cache is not touched)."""
        self._dying = True
        self._drain_inbox()
        states = list(self.scheduler.running) + list(self.scheduler.waiting)
        return [self._fail(s, error) for s in states]


def probe_request(engine: Engine, request_id: str) -> GenerateRequest:
    """Four EOS tokens in, two tokens out (a prefill and a decode): runs on any model."""
    ids = [min(engine.eos_token_ids, default=0)] * 4
    return GenerateRequest(
        prompt_token_ids=ids, params=SamplingParams(max_new_tokens=2), request_id=request_id
    )
