"""Deployment planner (`twinserve plan`): from a model and its traffic to instance, limits and cost.

```
model_shape  params, layers, KV heads, head size  (config.json of a folder/registry ref, or a preset)
instances    SageMaker instance catalog: GPUs, memory, bandwidth, FLOPS, on-demand $/h with its date
sizing       memory per GPU (weights + KV cache + overhead) and roofline latency/throughput
deployment   real-time / async / batch transform, explained by latency, throughput, data size, infra
plan         PlanRequest → make_plan → Plan (pure), with the EndpointConfig `endpoint create` reads
render       rich tables and YAML
```
Nothing here imports torch; a plan is computed in milliseconds.
"""

from __future__ import annotations

from twinserve.planner.model_shape import ModelShape, ModelSource, preset, resolve_source
from twinserve.planner.plan import NoFitError, Plan, PlanRequest, make_plan

__all__ = [
    "ModelShape",
    "ModelSource",
    "NoFitError",
    "Plan",
    "PlanRequest",
    "make_plan",
    "preset",
    "resolve_source",
]
