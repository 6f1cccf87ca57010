"""The served model's lifecycle and the one way routes reach the engine.

States: LOADING (the port is open, `/health` says 503) → READY → DRAINING (SIGTERM:
health turns 503 so balancers stop sending, in-flight work finishes) or FAILED (the
model could not load, or the engine died). Loading runs in a thread so the server
answers health checks from its first second, as SageMaker and Kubernetes expect.
A FAILED service calls `on_fatal`, and `serve` exits non-zero on it, so a supervisor
(SageMaker, Kubernetes, Ray, our endpoint controller) replaces the process instead of
a replica answering 503 forever. Health and error messages are stable sentences; the
exception behind them goes to the log only.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from twinserve import __version__
from twinserve.config import EngineConfig, ServeConfig
from twinserve.engine.async_engine import ENGINE_DEAD, AsyncEngine
from twinserve.engine.chat import render_chat
from twinserve.engine.request import MAX_STOP_SEQUENCES, GenerateRequest
from twinserve.errors import EngineDeadError, NotReadyError, TwinserveError, ValidationError
from twinserve.registry.resolve import ResolvedModel, resolve_model
from twinserve.server.generation import Generation
from twinserve.server.metrics import EngineGauges, ServerMetrics
from twinserve.server.protocol import tgi

log = logging.getLogger(__name__)

T = TypeVar("T")


class ServiceState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ModelService:
    """Owns the AsyncEngine: loads it, reports health and info, admits generations."""

    def __init__(
        self,
        config: ServeConfig,
        engine: AsyncEngine | None = None,
        resolved: ResolvedModel | None = None,
        generation_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.resolved = resolved
        self.state = ServiceState.READY if engine is not None else ServiceState.LOADING
        self.failure: str | None = None
        # why the model did not load, in words (the log has the traceback); `failure` stays the
        # generic public text, since /health is unauthenticated
        self.load_error: str | None = None
        self._generation_defaults = dict(generation_defaults or {})
        self._chat_template: str | None = None
        if resolved is not None:
            self._adopt_card(resolved)
        self.metrics = ServerMetrics(self._gauges)
        self.started_at = time.time()
        self._loader: threading.Thread | None = None
        # called (from a loader or engine thread) when the service FAILED; `serve` exits non-zero
        self.on_fatal: Callable[[], None] | None = None
        if engine is not None:
            self._watch(engine)
            engine.start()

    # ----------------------------------------------------------- lifecycle
    def start_loading(self) -> None:
        """Resolve and load the model in a background thread (no-op when already given one)."""
        if self.engine is not None or self._loader is not None:
            return
        self._loader = threading.Thread(target=self._load, name="twinserve-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.state is ServiceState.READY

    def _load(self) -> None:
        cfg = self.config
        try:
            if cfg.num_shard > 1:
                raise ValidationError(
                    f"num_shard={cfg.num_shard} (SM_NUM_GPUS/NUM_SHARD): tensor parallelism is not "
                    "supported by this engine yet; serve one replica per device instead"
                )
            log.info("resolving model", extra={"model": cfg.model, "revision": cfg.revision})
            resolved = resolve_model(cfg.model, cfg.revision)
            engine_config = self._engine_config(cfg, resolved)
            started = time.monotonic()
            engine = AsyncEngine.launch(engine_config, warmup=cfg.warmup)
            self._watch(engine)
            self.resolved, self.engine = resolved, engine
            if self.state is ServiceState.LOADING:
                self.state = ServiceState.READY
            log.info(
                "model ready",
                extra={
                    "model": resolved.model_id,
                    "path": str(resolved.path),
                    "revision": resolved.revision,
                    "registry_version": resolved.registry_version,
                    "weights_sha256": engine.engine.loaded.weights_sha256 if engine.engine.loaded else None,
                    "load_s": round(time.monotonic() - started, 2),
                },
            )
        except Exception as exc:
            message = exc.message if isinstance(exc, TwinserveError) else f"{type(exc).__name__}: {exc}"
            log.error(
                "model failed to load",
                extra={"reason": message},
                exc_info=not isinstance(exc, TwinserveError),
            )
            self.load_error = message
            self._fail("the model failed to load (the server log says why)")

    def _watch(self, engine: AsyncEngine) -> None:
        def dead(reason: str) -> None:
            log.critical("engine died; the server exits", extra={"reason": reason})
            self._fail(ENGINE_DEAD)

        engine.on_dead = dead

    def _fail(self, failure: str) -> None:
        self.failure = failure
        self.state = ServiceState.FAILED
        if self.on_fatal is not None:
            self.on_fatal()

    def engine_config_for(self, resolved: ResolvedModel) -> EngineConfig:
        """The engine config `resolved` loads with here (card applied, as `_load` does), for an
        in-process caller that launches the engine itself (batch transform)."""
        return self._engine_config(self.config, resolved)

    def _engine_config(self, cfg: ServeConfig, resolved: ResolvedModel) -> EngineConfig:
        """The engine's config for the resolved folder, with the model card applied.

        A registry version carries the content hash its files were verified against on resolve:
        the loader reports it instead of hashing the weights a second time. Folders and Hub
        snapshots have no recorded hash, so the loader computes theirs.
        """
        engine_config = self._with_card(cfg, resolved).engine_config(str(resolved.path))
        if resolved.content_sha256 is None:
            return engine_config
        return engine_config.model_copy(update={"weights_sha256": resolved.content_sha256})

    def _with_card(self, cfg: ServeConfig, resolved: ResolvedModel) -> ServeConfig:
        """Apply the model card: its generation defaults, and its serving limits and quantization
        where neither a flag nor the environment set them."""
        card = resolved.card
        if card is None:
            return cfg
        self._adopt_card(resolved)
        updates: dict[str, Any] = {}
        for field, value in (
            ("max_input_tokens", card.max_input_tokens),
            ("max_total_tokens", card.max_total_tokens),
            ("quantize", card.quantization),
        ):
            if value is not None and field not in cfg.model_fields_set:
                updates[field] = value
        return cfg.model_copy(update=updates) if updates else cfg

    def _adopt_card(self, resolved: ResolvedModel) -> None:
        """Generation defaults and chat template from the card (a request's own values win)."""
        if resolved.card is None:
            return
        self._generation_defaults = {
            **resolved.card.generation_defaults.model_dump(exclude_none=True),
            **self._generation_defaults,
        }
        self._chat_template = resolved.card.chat_template()

    def begin_drain(self) -> None:
        """Stop admitting (health 503); requests already admitted run to the end."""
        if self.state is not ServiceState.FAILED:
            self.state = ServiceState.DRAINING

    def requests_in_flight(self) -> int:
        """Requests the engine holds (validating, waiting or running): a drain waits for these."""
        return self.engine.engine.num_admitted if self.engine is not None else 0

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # --------------------------------------------------------------- health
    def health(self) -> tuple[bool, str, str | None]:
        """(ready, state name, reason) — what `/health` and `/ping` report."""
        if self.state is ServiceState.READY:
            assert self.engine is not None
            if self.engine.is_healthy:
                return True, "ready", None
            return False, "failed", ENGINE_DEAD
        return False, self.state.value, self.failure

    def ready_engine(self) -> AsyncEngine:
        ok, state, reason = self.health()
        if ok:
            assert self.engine is not None
            return self.engine
        if state == "failed":
            raise EngineDeadError(reason or "the model is not available")
        raise NotReadyError(
            "the model is still loading" if state == "loading" else "the server is shutting down"
        )

    # ------------------------------------------------------------ generation
    @property
    def tokenizer(self) -> Any:
        return self.ready_engine().engine.tokenizer

    async def submit(self, request: GenerateRequest) -> Generation:
        """Admit a request (422/429/503 raised here) and return its running generation."""
        self.metrics.request_received()
        try:
            stream = await self.ready_engine().submit(request)
        except TwinserveError as exc:
            self.metrics.request_failed(exc.error_type)
            raise
        return Generation(stream, request, self.metrics)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The rendered chat, on a validation thread (a template over a long chat is slow)."""
        engine = self.ready_engine()
        tokenizer, template = engine.engine.tokenizer, self._chat_template
        return await engine.off_loop(lambda: render_chat(tokenizer, messages, template))

    def tokenize(self, text: str, *, truncate: int | None) -> list[tgi.SimpleToken]:
        """`/tokenize`: the tokens generation would see, under its limits (blocking: call it off
        the loop)."""
        engine = self.ready_engine().engine
        tokens = self._tokens(text, truncate=truncate, add_special_tokens=True)
        engine.check_input_length(len(tokens), 0)
        return tokens

    def chat_tokens(self, prompt: str, *, truncate: int | None) -> list[tgi.SimpleToken]:
        """`/chat_tokenize`: a rendered chat's tokens as a chat completion counts them, i.e. with
        no special tokens added (the template wrote its own) and `truncate` applied. No input
        limit: the route measures, so that a caller can trim a prompt that does not fit."""
        return self._tokens(prompt, truncate=truncate, add_special_tokens=False)

    def _tokens(self, text: str, *, truncate: int | None, add_special_tokens: bool) -> list[tgi.SimpleToken]:
        engine = self.ready_engine().engine
        engine.check_truncate(truncate)
        encoding = engine.encode(text, add_special_tokens=add_special_tokens, offsets=True)
        pairs = list(zip(encoding["input_ids"], encoding["offset_mapping"], strict=True))
        if truncate is not None:
            pairs = pairs[-truncate:]
        return [tgi.SimpleToken(id=tid, text=text[a:b], start=a, stop=b) for tid, (a, b) in pairs]

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run request work off the event loop, on the engine's validation threads."""
        return await self.ready_engine().off_loop(fn)

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Parameters applied when a request leaves them unset (a model card's, once the
        registry provides one); an empty dict keeps TGI's own defaults."""
        return dict(self._generation_defaults)

    @property
    def compute_type(self) -> str:
        """TGI's `x-compute-type` header: the device the answer was computed on."""
        engine = self.engine
        loaded = engine.engine.loaded if engine is not None else None
        return loaded.device.type if loaded is not None else "cpu"

    @property
    def model_id(self) -> str:
        if self.resolved is not None:
            return self.resolved.model_id
        return self.config.model

    def _gauges(self) -> EngineGauges | None:
        if self.engine is None:
            return None
        core = self.engine.engine
        gauges = EngineGauges(queue_size=core.num_waiting, batch_size=core.num_running)
        cache = core.prefix_cache
        if cache is not None:
            gauges = replace(
                gauges,
                prefix_queries=cache.queries,
                prefix_queried_tokens=cache.queried_tokens,
                prefix_hit_tokens=cache.hit_tokens,
                prefix_tokens_held=cache.tokens_held,
            )
        spec = core.speculation
        if spec is not None:
            gauges = replace(
                gauges,
                speculation_steps=spec.steps,
                speculation_draft_tokens=spec.draft_tokens,
                speculation_accepted_tokens=spec.accepted_tokens,
            )
        return gauges

    def info(self) -> tgi.Info:
        engine = self.ready_engine()
        cfg = engine.config
        loaded = engine.engine.loaded
        assert self.resolved is not None
        return tgi.Info(
            model_id=self.model_id,
            model_sha=self.resolved.revision,
            model_dtype=str(loaded.dtype).removeprefix("torch.") if loaded else cfg.dtype,
            model_device_type=loaded.device.type if loaded else "cpu",
            max_concurrent_requests=cfg.max_concurrent_requests,
            max_stop_sequences=MAX_STOP_SEQUENCES,
            max_input_tokens=cfg.max_input_tokens,
            max_total_tokens=cfg.max_total_tokens,
            max_batch_prefill_tokens=cfg.max_batch_prefill_tokens,
            max_batch_total_tokens=cfg.max_batch_total_tokens,
            max_batch_size=cfg.max_batch_size,
            max_client_batch_size=self.config.max_client_batch_size,
            validation_workers=cfg.validation_workers,
            quantize=cfg.quantize,
            version=__version__,
            model_revision=self.resolved.revision,
            registry_name=self.resolved.registry_name,
            registry_version=self.resolved.registry_version,
            prompt_template=self.resolved.card.template_label() if self.resolved.card else "tokenizer",
            weights_sha256=loaded.weights_sha256 if loaded else "",
        )
