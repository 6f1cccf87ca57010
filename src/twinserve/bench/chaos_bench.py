"""`twinserve bench chaos`: kill -9 one process at a random moment of an operation, then let the
endpoint heal by itself, and check that it did.

Each run picks an operation for the endpoint "chaos" (create when it does not exist; otherwise
update, scale or delete) and starts it as a user would, with the `twinserve endpoint …` CLI in
its own process. At a random moment within the operation's usual length it SIGKILLs one of: that
CLI process, the endpoint's controller, its router, one of its replicas (whichever the draw names,
or another that runs at that moment). Then it issues no command: it only watches, for up to
`heal_timeout_s`, until these invariants hold together (heal time: from the kill):
- the endpoint is InService or fully gone (no state row and no process of it left);
- InService: on the URL it had before (unless the run created it), the generation it had or the
  next one (an update finished or rolled back), each variant's count of healthy replicas of that
  generation equal to its desired count, which is the count before or the one asked for; no
  replica of another generation, no replica process without a record, the router and the
  controller running, and a request through the router answered;
- after healing, 3 more requests through the router are answered (a violation otherwise).
Everything runs in a temporary TWINSERVE_HOME (its own state store), deleted at the end, with
every process of the endpoint stopped, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field, computed_field

from twinserve.deploy.spec import Endpoint, EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError
from twinserve.platforms.local.gateway import stop_gateway
from twinserve.platforms.local.gateway.process import MODULE as GATEWAY_MODULE
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.processes import running

Progress = Callable[[str], None]
Operation = Literal["create", "update", "scale", "delete"]
Target = Literal["cli", "controller", "router", "replica"]
TARGETS: tuple[Target, ...] = ("cli", "controller", "router", "replica")
NAME = "chaos"
_POLL_S = 0.5
# what an operation usually takes here before any run measured it (seconds, CLI start included)
_FIRST_GUESS_S: dict[Operation, float] = {"create": 8.0, "update": 10.0, "scale": 6.0, "delete": 3.0}
# with the endpoint there: which operation a run starts
_WEIGHTS: dict[Operation, float] = {"update": 0.35, "scale": 0.4, "delete": 0.25}


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


_EVIDENCE_LOGS = ("router", "controller", "control")  # the processes that heal an endpoint


class ChaosConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Model folder or registry reference for the replicas.")
    runs: int = Field(30, ge=1, description="Operations, each with one kill.")
    seed: int = Field(0, description="Seeds the draws: the same seed gives the same operations and kills.")
    heal_timeout_s: float = Field(120.0, gt=0, description="How long a run may take to heal.")
    max_replicas: int = Field(2, ge=1, le=4, description="A scale moves the count within 1..max_replicas.")
    targets: tuple[Target, ...] = Field(TARGETS, min_length=1, description="What may be killed.")


class ChaosRun(BaseModel):
    index: int
    operation: Operation
    killed: Target | None = Field(description="What was SIGKILLed; None: nothing of it ran any more.")
    kill_after_s: float = Field(description="Seconds from the operation's start to the kill.")
    cli_exit: int | None = Field(description="The CLI's exit code; None when it was the one killed.")
    outcome: Literal["in_service", "gone"] | None = Field(description="The healed state; None: not healed.")
    heal_s: float | None = Field(description="Seconds from the kill to all invariants holding.")
    violations: list[str] = Field(default_factory=list)


class ChaosReport(BaseModel):
    config: ChaosConfig
    runs: list[ChaosRun]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kills_by_target(self) -> dict[str, int]:
        return dict(Counter(r.killed or "nothing" for r in self.runs))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def operations(self) -> dict[str, int]:
        return dict(Counter(r.operation for r in self.runs))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def heal_s_p50(self) -> float | None:
        healed = [r.heal_s for r in self.runs if r.heal_s is not None]
        return statistics.median(healed) if healed else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def heal_s_max(self) -> float | None:
        healed = [r.heal_s for r in self.runs if r.heal_s is not None]
        return max(healed) if healed else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def violations(self) -> int:
        return sum(len(r.violations) for r in self.runs)


class _Before(BaseModel):
    """What the endpoint was when the run started (None fields: it did not exist)."""

    url: str | None = None
    generation: int | None = None
    desired: dict[str, int] = Field(default_factory=dict)


class ChaosBench:
    """One temporary home, one endpoint, `runs` operations each cut by a kill."""

    def __init__(self, config: ChaosConfig, home: Path, progress: Progress = _quiet) -> None:
        self.config = config
        self.home = home
        self.progress = progress
        self.store = StateStore(home / "endpoints" / "state.db")
        self.manager = LocalPlatform(self.store, LocalRuntime(self.store, home=home))
        self.rng = random.Random(config.seed)
        self.took: dict[Operation, list[float]] = {op: [] for op in _FIRST_GUESS_S}
        self.config_file = home / "chaos.yaml"
        self.config_file.write_text(yaml.safe_dump(self._endpoint_config()))

    def _endpoint_config(self) -> dict[str, object]:
        variant = {
            "model": self.config.model,
            "replicas": 1,
            "threads": 1,
            "dtype": "float32",
            "device": "cpu",
        }
        return {"name": NAME, "startup_timeout_s": 120, "drain_timeout_s": 1, "variants": [variant]}

    # ------------------------------------------------------------ one run
    def run(self, index: int) -> ChaosRun:
        before = self._before()
        operation = self._pick_operation(before)
        argv, asked = self._command(operation, before)
        kill_after = self.rng.uniform(0.1, self._usual_length(operation))
        wanted = self.rng.choice(self.config.targets)
        self.progress(
            f"run {index + 1}/{self.config.runs}: {operation}, kill ~{wanted} after {kill_after:.1f}s"
        )
        started = time.monotonic()
        cli = subprocess.Popen(
            argv,
            env={**os.environ, "TWINSERVE_HOME": str(self.home)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            cli.wait(kill_after)
        if cli.returncode is not None:
            self.took[operation].append(time.monotonic() - started)
        killed = self._kill(wanted, cli)
        killed_at = time.monotonic()
        try:
            cli_exit: int | None = cli.wait(self.config.heal_timeout_s)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait()
            return self._result(index, operation, killed, kill_after, None, None, ["the CLI never finished"])
        if killed == "cli":
            cli_exit = None
        outcome, heal_s, problems = self._heal(before, operation, asked, killed_at)
        if outcome == "in_service":
            problems += self._serves_after_healing()
        if problems:  # counted; start the next run from a clean slate rather than from the wreck
            self.close()
        return self._result(
            index,
            operation,
            killed,
            kill_after,
            cli_exit,
            outcome if not problems else None,
            problems,
            heal_s,
        )

    def _result(
        self,
        index: int,
        operation: Operation,
        killed: Target | None,
        kill_after: float,
        cli_exit: int | None,
        outcome: Literal["in_service", "gone"] | None,
        violations: list[str],
        heal_s: float | None = None,
    ) -> ChaosRun:
        return ChaosRun(
            index=index,
            operation=operation,
            killed=killed,
            kill_after_s=round(kill_after, 2),
            cli_exit=cli_exit,
            outcome=outcome,
            heal_s=None if heal_s is None else round(heal_s, 2),
            violations=violations,
        )

    def _before(self) -> _Before:
        try:
            ep = self.store.get_endpoint(NAME)
        except NotFoundError:
            return _Before()
        return _Before(
            url=ep.url,
            generation=ep.generation,
            desired={v.name: ep.desired(v.name) for v in ep.config.variants},
        )

    def _pick_operation(self, before: _Before) -> Operation:
        if before.generation is None:
            return "create"
        ops = list(_WEIGHTS)
        return self.rng.choices(ops, weights=[_WEIGHTS[o] for o in ops])[0]

    def _command(self, operation: Operation, before: _Before) -> tuple[list[str], int | None]:
        """The CLI's argv, and the replica count a scale asks for."""
        cli = [sys.executable, "-m", "twinserve.cli.main", "endpoint"]
        if operation == "create":
            return [*cli, "create", NAME, "--config", str(self.config_file)], None
        if operation == "update":
            return [*cli, "update", NAME, "--model", self.config.model], None
        if operation == "delete":
            return [*cli, "delete", NAME], None
        current = next(iter(before.desired.values()), 1)
        choices = [n for n in range(1, self.config.max_replicas + 1) if n != current] or [current]
        asked = self.rng.choice(choices)
        return [*cli, "scale", NAME, "--replicas", str(asked)], asked

    def _usual_length(self, operation: Operation) -> float:
        seen = self.took[operation]
        return statistics.median(seen) if seen else _FIRST_GUESS_S[operation]

    def _kill(self, wanted: Target, cli: subprocess.Popen[bytes]) -> Target | None:
        """SIGKILL the wanted kind of process, or another that runs now; what was killed."""
        others = [t for t in self.config.targets if t != wanted]
        self.rng.shuffle(others)
        for target in (wanted, *others):
            pid = self._pid_of(target, cli)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    return target
        return None

    def _pid_of(self, target: Target, cli: subprocess.Popen[bytes]) -> int | None:
        if target == "cli":
            return cli.pid if cli.poll() is None else None
        try:
            ep = self.store.get_endpoint(NAME)
        except NotFoundError:
            return None
        if target == "controller":
            return ep.controller_pid if self.manager.controller_alive(ep) else None
        if target == "router":
            return ep.router_pid if self.manager.router.is_ours(ep.router_pid, NAME) else None
        pids = [r.pid for r in ep.replicas if r.pid is not None and running(r.pid)]
        return self.rng.choice(pids) if pids else None

    # ------------------------------------------------------------ healing
    def _heal(
        self, before: _Before, operation: Operation, asked: int | None, killed_at: float
    ) -> tuple[Literal["in_service", "gone"] | None, float | None, list[str]]:
        """Watch until the invariants hold (outcome, seconds from the kill) or the time is up
        (None, None, what still did not hold)."""
        deadline = killed_at + self.config.heal_timeout_s
        problems: list[str] = []
        while True:
            outcome, problems = self._check(before, operation, asked)
            if not problems:
                return outcome, time.monotonic() - killed_at, []
            if time.monotonic() >= deadline:
                unhealed = [f"not healed after {self.config.heal_timeout_s:.0f}s: {p}" for p in problems]
                return None, None, [*unhealed, self._evidence()]
            time.sleep(_POLL_S)

    def _evidence(self) -> str:
        """What a run that did not heal leaves to go on (its folder is deleted afterwards): the
        endpoint's status and operation, and the last lines of its control processes' logs."""
        try:
            ep = self.store.get_endpoint(NAME)
        except NotFoundError:
            return "evidence: the endpoint is gone"
        holder = ep.operation_holder.describe() if ep.operation_holder is not None else None
        tails = {k: v for k, v in self.manager.logs(NAME, lines=15).items() if k in _EVIDENCE_LOGS}
        logs = "\n".join(f"--- {label}\n{text}" for label, text in tails.items())
        return f"evidence: status {ep.status.value}, operation {ep.operation} ({holder})\n{logs}"

    def _check(
        self, before: _Before, operation: Operation, asked: int | None
    ) -> tuple[Literal["in_service", "gone"], list[str]]:
        try:
            ep = self.store.get_endpoint(NAME)
        except NotFoundError:
            left = endpoint_processes(self.store.path, gateway=False)
            return "gone", [f"deleted, but processes of it still run: {left}"] if left else []
        return "in_service", self._in_service_problems(ep, before, operation, asked)

    def _in_service_problems(
        self, ep: Endpoint, before: _Before, operation: Operation, asked: int | None
    ) -> list[str]:
        if ep.status is not EndpointStatus.IN_SERVICE or ep.operation is not None:
            return [f"{ep.status} (operation {ep.operation or 'none'}), not InService and idle"]
        problems: list[str] = []
        if before.url is not None and ep.url != before.url:
            problems.append(f"the URL moved: {before.url} → {ep.url}")
        expected_generations = {1} if before.generation is None else {before.generation}
        if operation == "update" and before.generation is not None:
            expected_generations.add(before.generation + 1)
        if ep.generation not in expected_generations:
            problems.append(f"generation {ep.generation}, expected one of {sorted(expected_generations)}")
        replicas = self.manager.runtime.find_replicas(NAME)
        for v in ep.config.variants:
            desired = ep.desired(v.name)
            allowed = {before.desired.get(v.name, v.replicas)} | ({asked} if asked is not None else set())
            if desired not in allowed:
                problems.append(f"{v.name}: desired {desired}, expected one of {sorted(allowed)}")
            healthy = sum(
                r.variant == v.name and r.generation == ep.generation and r.state.serves for r in replicas
            )
            if healthy != desired or len([r for r in replicas if r.variant == v.name]) != desired:
                states = ", ".join(f"{r.id}: {r.state} g{r.generation}" for r in replicas) or "none"
                problems.append(f"{v.name}: {healthy} healthy of {desired} desired ({states})")
        if orphans := self.manager.runtime.find_orphans(NAME):
            problems.append(f"replica processes without a record: {orphans}")
        if not self.manager.router_alive(ep):
            problems.append("the router is down")
        if not self.manager.controller_alive(ep):
            problems.append("the controller is down")
        if not problems and not _answers(ep):
            problems.append("a request through the router failed")
        return problems

    def _serves_after_healing(self) -> list[str]:
        ep = self.store.get_endpoint(NAME)
        failed = sum(not _answers(ep) for _ in range(3))
        return [f"{failed} of 3 requests after healing failed"] if failed else []

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Delete the endpoint and stop anything of it that is still running."""
        with contextlib.suppress(Exception):
            self.manager.delete(NAME)
        stop_gateway(self.home)
        for pid in endpoint_processes(self.store.path, gateway=True):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def _answers(ep: Endpoint) -> bool:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    try:
        return httpx.post(f"{ep.url}/generate", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def endpoint_processes(state_path: Path, *, gateway: bool) -> list[int]:
    """Every process working for endpoints of this state store: replicas (by their environment),
    the router, controller, job service and detached operations (by `--state` on their command
    line); with `gateway`, the home's SageMaker Runtime gateway as well (it serves every local
    endpoint of the home, and a delete that was cut short may leave it up for the next create)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid == os.getpid() or not any("twinserve" in a for a in cmdline):
            continue
        if not gateway and GATEWAY_MODULE in cmdline:
            continue
        if "--state" in cmdline and str(state_path) in cmdline:
            found.append(proc.pid)
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("TWINSERVE_ENDPOINT_STATE") == str(state_path):
                found.append(proc.pid)
    return found


def run_chaos(config: ChaosConfig, progress: Progress = _quiet) -> ChaosReport:
    """All the runs, in a temporary home removed at the end (every process of it stopped)."""
    with tempfile.TemporaryDirectory(prefix="twinserve-chaos-") as tmp:
        bench = ChaosBench(config, Path(tmp), progress)
        runs: list[ChaosRun] = []
        try:
            for i in range(config.runs):
                run = bench.run(i)
                runs.append(run)
                say = (
                    f"healed in {run.heal_s:.1f}s ({run.outcome})" if run.heal_s is not None else "NOT healed"
                )
                progress(f"run {i + 1}: {run.operation}, killed {run.killed or 'nothing'}: {say}")
        finally:
            bench.close()
    return ChaosReport(config=config, runs=runs)
