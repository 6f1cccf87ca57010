"""The promotion gate's logic: parsing, thresholds, direction, comparison with the holder."""

from __future__ import annotations

import pytest

from twinserve.errors import ValidationError
from twinserve.registry.gate import Requirement, evaluate_gate, parse_requirements


@pytest.mark.parametrize(
    ("text", "metric", "op", "value"),
    [
        ("rougeL>=0.35", "rougeL", ">=", 0.35),
        (" toxicity <= 0.1 ", "toxicity", "<=", 0.1),
        ("eval/loss<2e-1", "eval/loss", "<", 0.2),
        ("n==3", "n", "==", 3.0),
        ("bleu>-1", "bleu", ">", -1.0),
    ],
)
def test_parse(text: str, metric: str, op: str, value: float) -> None:
    req = Requirement.parse(text)
    assert (req.metric, req.op, req.threshold) == (metric, op, value)


@pytest.mark.parametrize(
    "text", ["rougeL=>0.3", "rougeL>=", ">=0.3", "rougeL>=abc", "rouge L>=1", "x>=nan", ""]
)
def test_bad_syntax_is_a_validation_error(text: str) -> None:
    with pytest.raises(ValidationError, match="bad requirement"):
        Requirement.parse(text)


def test_every_requirement_must_hold() -> None:
    reqs = parse_requirements(["rougeL>=0.35", "toxicity<=0.1"])
    assert evaluate_gate({"rougeL": 0.41, "toxicity": 0.05}, reqs).passed
    result = evaluate_gate({"rougeL": 0.30, "toxicity": 0.05}, reqs)
    assert not result.passed and [c.check for c in result.failures] == ["rougeL>=0.35"]
    assert "rougeL = 0.3" in result.reason()


def test_an_unlogged_metric_fails() -> None:
    result = evaluate_gate({"rougeL": 0.5}, parse_requirements(["toxicity<=0.1"]))
    assert not result.passed and "never logged" in result.reason()


def test_compare_to_uses_each_requirement_direction() -> None:
    reqs = parse_requirements(["rougeL>=0.35", "toxicity<=0.1"])
    champion = {"rougeL": 0.40, "toxicity": 0.04}
    assert evaluate_gate({"rougeL": 0.42, "toxicity": 0.03}, reqs, champion, "champion (v2)").passed
    worse = evaluate_gate({"rougeL": 0.39, "toxicity": 0.03}, reqs, champion, "champion (v2)")
    assert not worse.passed
    assert worse.failures[0].check == "rougeL not worse than champion (v2)"
    assert "0.39 is worse than 0.4" in worse.reason()
    more_toxic = evaluate_gate({"rougeL": 0.5, "toxicity": 0.05}, reqs, champion)
    assert [c.check for c in more_toxic.failures] == ["toxicity not worse than the current holder"]


def test_a_baseline_without_the_metric_is_not_a_failure() -> None:
    result = evaluate_gate({"rougeL": 0.4}, parse_requirements(["rougeL>=0.35"]), {}, "champion")
    assert result.passed and "nothing to compare" in result.checks[-1].detail


def test_contradicting_directions_are_refused() -> None:
    with pytest.raises(ValidationError, match="disagree"):
        evaluate_gate({"x": 1}, parse_requirements(["x>=0", "x<=5"]), {"x": 1})
