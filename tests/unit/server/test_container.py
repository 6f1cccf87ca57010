"""The container image without docker: the entry point's choices, and the Dockerfile's shape.

The entry point (docker/entrypoint.sh) runs under bash with a fake `twinserve` on PATH that
records its argv and environment; what it recorded is then fed to the real `twinserve serve`
CLI (with the server itself stubbed out) to see the host, port and model it would serve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from twinserve.config import ServeConfig

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


# ---------------------------------------------------------------- the entry point


def run_entrypoint(tmp_path: Path, *argv: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run the entry point; returns the process and what the fake `twinserve` recorded (or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "twinserve"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['RECORD'], 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, f)\n"
    )
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    record.unlink(missing_ok=True)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), **env}
    assert BASH is not None
    proc = subprocess.run(
        [BASH, str(ENTRYPOINT), *argv], env=full_env, capture_output=True, text=True, timeout=30
    )
    recorded = json.loads(record.read_text()) if record.exists() else None
    return proc, recorded


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    """A stand-in for /opt/ml/model: a config, no weights yet."""
    folder = tmp_path / "opt-ml-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "weights", ["model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin"]
)
def test_serve_takes_the_weights_sagemaker_unpacked(tmp_path: Path, model_dir: Path, weights: str) -> None:
    (model_dir / weights).write_bytes(b"\0")
    proc, rec = run_entrypoint(
        tmp_path, "serve", SM_MODEL_DIR=str(model_dir), HF_MODEL_ID="org/other", TWINSERVE_MODEL="x/y"
    )
    assert proc.returncode == 0, proc.stderr
    # the unpacked weights win over any model named in the environment
    assert rec["argv"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--model", str(model_dir)]


@pytest.mark.parametrize("present", [True, False])
def test_serve_without_weights_leaves_the_model_to_the_environment(
    tmp_path: Path, model_dir: Path, present: bool
) -> None:
    folder = model_dir if present else tmp_path / "missing"
    proc, rec = run_entrypoint(
        tmp_path, "serve", SM_MODEL_DIR=str(folder), HF_MODEL_ID="org/name", HF_MODEL_REVISION="abc123"
    )
    assert proc.returncode == 0, proc.stderr
    assert rec["argv"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert rec["env"]["HF_MODEL_ID"] == "org/name" and rec["env"]["HF_MODEL_REVISION"] == "abc123"
    assert "org/name" in proc.stderr


def test_model_dir_defaults_to_sagemakers_path() -> None:
    assert 'model_dir="${SM_MODEL_DIR:-/opt/ml/model}"' in ENTRYPOINT.read_text()


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({"SAGEMAKER_BIND_TO_PORT": "9001", "PORT": "7000"}, "9001"),  # SageMaker's choice first
        ({"TWINSERVE_PORT": "7001", "PORT": "7000"}, "7001"),
        ({"PORT": "7000"}, "7000"),
        ({}, "8080"),
    ],
)
def test_serve_port(tmp_path: Path, model_dir: Path, env: dict[str, str], port: str) -> None:
    proc, rec = run_entrypoint(tmp_path, "serve", SM_MODEL_DIR=str(model_dir), **env)
    assert proc.returncode == 0, proc.stderr
    assert rec["argv"][:5] == ["serve", "--host", "0.0.0.0", "--port", port]


def test_no_command_means_serve_and_flags_after_serve_are_kept(tmp_path: Path, model_dir: Path) -> None:
    _, rec = run_entrypoint(tmp_path, SM_MODEL_DIR=str(model_dir))
    assert rec["argv"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    _, rec = run_entrypoint(tmp_path, "serve", "--max-input-tokens", "512", SM_MODEL_DIR=str(model_dir))
    assert rec["argv"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--max-input-tokens", "512"]


def test_other_commands_run_as_given(tmp_path: Path, model_dir: Path) -> None:
    (model_dir / "model.safetensors").write_bytes(b"\0")
    proc, rec = run_entrypoint(
        tmp_path, "twinserve", "plan", "--preset", "llama-3.1-8b", SM_MODEL_DIR=str(model_dir)
    )
    assert proc.returncode == 0, proc.stderr
    assert rec["argv"] == ["plan", "--preset", "llama-3.1-8b"]
    # `twinserve serve` given in full is passed through too: no flags added
    _, rec = run_entrypoint(tmp_path, "twinserve", "serve", SM_MODEL_DIR=str(model_dir))
    assert rec["argv"] == ["serve"]
    proc, rec = run_entrypoint(tmp_path, "bash", "-c", "echo hello; exit 7")
    assert (proc.returncode, proc.stdout, rec) == (7, "hello\n", None)


# ---------------------------------------------------------------- what `twinserve serve` makes of it


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    prefixes = ("SM_", "HF_MODEL", "MAX_", "SAGEMAKER_", "TWINSERVE_")
    for name in list(os.environ):
        if (name.startswith(prefixes) and name != "TWINSERVE_HOME") or name in ("PORT", "MODEL_ID"):
            monkeypatch.delenv(name)
    return monkeypatch


def serve_config_of(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]) -> ServeConfig:
    """The ServeConfig the real `twinserve` CLI builds from argv and env (nothing is served)."""
    import twinserve.server.run
    from twinserve.cli.main import app

    seen: list[ServeConfig] = []
    monkeypatch.setattr(twinserve.server.run, "serve", seen.append)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_serve_as_sagemaker_runs_it(tmp_path: Path, model_dir: Path, clean_env: pytest.MonkeyPatch) -> None:
    env = {"HF_MODEL_ID": "org/name", "HF_MODEL_REVISION": "abc123", "MAX_INPUT_TOKENS": "3000"}
    env |= {"MAX_TOTAL_TOKENS": "4096", "SM_NUM_GPUS": "1"}
    _, rec = run_entrypoint(tmp_path, "serve", SM_MODEL_DIR=str(model_dir), **env)
    config = serve_config_of(clean_env, rec["argv"], {k: rec["env"][k] for k in env})
    assert (config.resolved_host(), config.resolved_port()) == ("0.0.0.0", 8080)
    assert (config.model, config.revision) == ("org/name", "abc123")
    assert (config.max_input_tokens, config.max_total_tokens) == (3000, 4096)

    (model_dir / "model.safetensors").write_bytes(b"\0")
    _, rec = run_entrypoint(tmp_path, "serve", SM_MODEL_DIR=str(model_dir), **env)
    assert serve_config_of(clean_env, rec["argv"], {}).model == str(model_dir)


def test_twinserve_serve_in_the_image_listens_on_8080_on_all_interfaces(
    clean_env: pytest.MonkeyPatch,
) -> None:
    # outside a container the defaults stay private...
    config = serve_config_of(clean_env, ["serve"], {})
    assert (config.resolved_host(), config.resolved_port()) == ("127.0.0.1", 3000)
    # ...inside, the image's ENV moves `twinserve serve` (no flags) to 0.0.0.0:8080
    image_env = {
        k: v for k, v in final_stage_env().items() if k in ("TWINSERVE_HOST", "TWINSERVE_PORT", "PORT")
    }
    config = serve_config_of(clean_env, ["serve"], image_env)
    assert (config.resolved_host(), config.resolved_port()) == ("0.0.0.0", 8080)


# ---------------------------------------------------------------- the Dockerfile


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def final_stage_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, rest in final_stage():
        if kw == "ENV":
            env |= dict(re.findall(r'(\w+)=("[^"]*"|\S+)', rest))
    return env


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    out = []
    for kw, rest in instructions():
        if kw in ("COPY", "ADD"):
            assert kw == "COPY", "ADD fetches and unpacks; the Dockerfile uses COPY"
            words = rest.split()
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            out.append((paths[:-1], paths[-1]))
    return out


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append(line)
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in rules:  # later rules win, `!` re-includes, as in Docker
        negate = rule.startswith("!")
        pattern = re.escape(rule.lstrip("!").strip("/"))
        pattern = pattern.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        pattern = pattern.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(pattern, p) for p in prefixes):
            result = not negate
    return result


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    sources = [src for srcs, _ in copies() for src in srcs]
    assert {"pyproject.toml", "README.md", "src", "docker/entrypoint.sh"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    # every module of the package reaches the image (e.g. engine/models/ despite `models` ignored)
    modules = [p.relative_to(REPO).as_posix() for p in (REPO / "src").rglob("*.py")]
    assert modules and not [m for m in modules if ignored(m)]


def test_dockerignore_keeps_environments_caches_and_weights_out() -> None:
    for path in (".venv", ".git", ".cache/test-home", "src/twinserve/__pycache__/x.pyc", "tests/unit"):
        assert ignored(path), path
    for path in ("model.gguf", "models/llm-twin/model.safetensors", "a/b/pytorch_model.bin"):
        assert ignored(path), path


def test_entrypoint_is_the_copied_script() -> None:
    (entry,) = [json.loads(rest) for kw, rest in final_stage() if kw == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for kw, rest in final_stage() if kw == "CMD"]
    destinations = {dest for srcs, dest in copies() if srcs == ["docker/entrypoint.sh"]}
    assert entry == [next(iter(destinations))] and cmd == ["serve"]
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")


def test_image_serves_8080_as_a_non_root_user_with_a_ping_healthcheck() -> None:
    stage = final_stage()
    assert ("EXPOSE", "8080") in stage
    (user,) = [rest for kw, rest in stage if kw == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    (health,) = [rest for kw, rest in stage if kw == "HEALTHCHECK"]
    assert "/ping" in health and "8080" in health
    env = final_stage_env()
    assert (env["TWINSERVE_HOST"], env["PORT"]) == ("0.0.0.0", "8080")


def test_torch_is_installed_pinned_from_its_index_before_the_package() -> None:
    steps = instructions()
    args = {m[0]: m[1] for kw, rest in steps if kw == "ARG" for m in [rest.split("=", 1)] if len(m) == 2}
    # the same pin as `make venv` and CI
    makefile_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert makefile_pin is not None and f"torch=={args['TORCH_VERSION']}" == makefile_pin[1]
    assert args["VARIANT"] == "cpu" and args["CPU_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["CUDA_TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert args["CUDA_BASE"].startswith("nvidia/cuda:") and "-runtime-" in args["CUDA_BASE"]
    froms = [rest for kw, rest in steps if kw == "FROM"]
    assert froms[-1] == "base-${VARIANT}" and {"${CPU_BASE} AS base-cpu", "${CUDA_BASE} AS base-cuda"} <= set(
        froms
    )
    runs = [rest for kw, rest in final_stage() if kw == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]
    package_step = next(i for i, r in enumerate(runs) if re.search(r"pip install /opt/twinserve\s*$", r))
    assert torch_step < package_step
    assert not any("[dev]" in r for r in runs)
