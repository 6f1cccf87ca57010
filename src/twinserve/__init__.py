"""twinserve: from a model registry to production LLM inference, on a laptop, a GPU box or the cloud."""

from __future__ import annotations

__version__ = "0.1.0"
