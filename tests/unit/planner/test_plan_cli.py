"""`twinserve plan` through the real typer app: tables, JSON, YAML, and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from twinserve.cli.main import app
from twinserve.deploy.spec import EndpointConfig

runner = CliRunner()
BOOK = ["plan", "--preset", "llama-3.1-8b", "--prompt-tokens", "1500", "--output-tokens", "500"]


def test_root_help_lists_plan() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "plan" in result.output


def test_book_case_json() -> None:
    result = runner.invoke(app, [*BOOK, "--requests-per-s", "2", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert not plan["instance"]["instance_type"].startswith("ml.g4dn")
    assert plan["limits"]["max_input_tokens"] == 2048 and plan["limits"]["max_total_tokens"] == 4096
    assert plan["deployment"]["type"] == "real-time"
    assert plan["endpoint_config"]["variants"][0]["model"] == "models:/llm-twin@champion"


def test_table_shows_the_memory_breakdown_and_the_books_instance() -> None:
    result = runner.invoke(app, [*BOOK, "--requests-per-s", "0.2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("ml.g5.2xlarge", "SM_NUM_GPUS", "MAX_BATCH_TOTAL_TOKENS", "KV cache per token", "128.0 KiB",
                 "2 × 32 layers × 8 KV heads × 128 dims", "Why real-time", "Instances considered", "placeholder"):  # fmt: skip
        assert text in result.output, text


def test_yaml_file_is_what_endpoint_create_reads(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    result = runner.invoke(
        app, [*BOOK, "--requests-per-s", "2", "--endpoint-name", "twin", "--yaml", str(path)]
    )
    assert result.exit_code == 0, result.output
    config = EndpointConfig.from_yaml(path)
    assert config.name == "twin" and config.variants[0].device == "cuda"
    assert config.autoscaling is not None and config.autoscaling.type == "target_tracking"
    assert "twinserve endpoint create twin --config" in result.output


def test_no_flags_plan_the_default_model_on_cpu() -> None:
    result = runner.invoke(app, ["plan", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["memory"]["device"] == "cpu" and plan["instance"]["num_gpus"] == 0
    assert plan["model_ref"] == "default" and plan["request"]["requests_per_s"] == 1.0


def test_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_attention_heads": 9,
                "num_hidden_layers": 30,
                "num_key_value_heads": 3,
                "vocab_size": 49152,
                "tie_word_embeddings": True,
                "max_position_embeddings": 8192,
            }
        )  # fmt: skip
    )
    result = runner.invoke(app, ["plan", "--model", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model_ref"] == str(tmp_path)


def test_batch_and_async_flags() -> None:
    batch = runner.invoke(app, [*BOOK, "--dataset-rows", "50000", "--deadline-h", "4", "--json"])
    assert batch.exit_code == 0, batch.output
    assert json.loads(batch.output)["deployment"]["type"] == "batch-transform"
    queued = runner.invoke(app, [*BOOK, "--requests-per-s", "1", "--no-clients-wait", "--json"])
    assert queued.exit_code == 0, queued.output
    assert json.loads(queued.output)["deployment"]["type"] == "async"


def test_bad_values_exit_2_with_the_field_named() -> None:
    result = runner.invoke(app, [*BOOK, "--prompt-tokens", "0"])
    assert result.exit_code == 2
    assert "prompt_tokens" in result.output and "Traceback" not in result.output
    both = runner.invoke(app, ["plan", "--model", "default", "--preset", "mistral-7b"])
    assert both.exit_code == 2 and "not both" in both.output
    unknown = runner.invoke(app, ["plan", "--preset", "gpt-5"])
    assert unknown.exit_code == 2 and "known presets" in unknown.output
    dtype = runner.invoke(app, [*BOOK, "--dtype", "int3"])
    assert dtype.exit_code == 2 and "dtype" in dtype.output


def test_nothing_fits_exits_1_with_the_reason(tmp_path: Path) -> None:
    t4 = runner.invoke(app, [*BOOK, "--instance", "ml.g4dn.xlarge"])
    assert t4.exit_code == 1 and "NVIDIA T4" in t4.output
    missing = runner.invoke(app, ["plan", "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such folder" in missing.output
