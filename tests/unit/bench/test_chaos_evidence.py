"""What `twinserve bench chaos` reports of a run that did not heal: its folder is deleted after the
run, so the endpoint's state and its control processes' logs go into the violation itself."""

from __future__ import annotations

from pathlib import Path

from twinserve.bench.chaos_bench import NAME, ChaosBench, ChaosConfig
from twinserve.deploy.spec import Endpoint, EndpointConfig
from twinserve.platforms.local.platform import CONTROLLER_LOG, ROUTER_LOG


def test_an_unhealed_run_carries_the_endpoints_state_and_log_tails(tmp_path: Path) -> None:
    bench = ChaosBench(ChaosConfig(model=str(tmp_path / "model")), tmp_path)
    assert bench._evidence() == "evidence: the endpoint is gone"
    bench.store.put_endpoint(
        Endpoint.new(EndpointConfig.single(NAME, "models:/llm-twin@champion", replicas=1))
    )
    logs = bench.manager.endpoint_dir(NAME)
    logs.mkdir(parents=True, exist_ok=True)
    (logs / ROUTER_LOG).write_text("".join(f"router line {i}\n" for i in range(40)))
    (logs / CONTROLLER_LOG).write_text("reconcile failed; next try in 8s\n")
    evidence = bench._evidence()
    assert evidence.startswith("evidence: status ") and "operation None" in evidence
    assert "--- router" in evidence and "router line 39" in evidence and "router line 10\n" not in evidence
    assert "--- controller\nreconcile failed; next try in 8s" in evidence
