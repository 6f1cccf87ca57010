"""Build a ready engine from an `EngineConfig`: threads, model, runner, warm-up."""

from __future__ import annotations

import logging

import torch

from twinserve.config import EngineConfig
from twinserve.engine.engine import Engine
from twinserve.engine.loader import load_model
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig, *, warmup: bool = True) -> Engine:
    """Load the model and return an engine whose first real request pays no warm-up cost."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    loaded = load_model(config)
    engine = Engine(config, ModelRunner(loaded, config), loaded.tokenizer, loaded.eos_token_ids)
    engine.loaded = loaded
    if warmup:
        warm_up(engine)
    return engine


def warm_up(engine: Engine) -> None:
    """One short greedy generation, so kernels and allocators are initialised before serving."""
    ids = [engine.eos_token_ids and min(engine.eos_token_ids) or 0] * 4
    state = engine.add_request(
        GenerateRequest(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=2), request_id="warmup")
    )
    while not state.status.is_finished:
        engine.step()
    engine.step()  # releases the cache once idle
