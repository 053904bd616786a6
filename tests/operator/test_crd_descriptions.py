"""Every field of the CodaTrainingRun CRD carries a description, so `kubectl explain` documents it.

The descriptions come from pydantic `Field(description=...)` in the trainer's config and the
operator's api models; `coda_operator.crd` carries them into the schema. A new field without one
fails here with its path (e.g. spec.stages[].optimizer.peakLr).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from coda_operator import crd
from operator_testkit import ROOT


def _schema_nodes(node: dict[str, Any], path: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, property name, schema) of every property below `node`, depth first.

    Lists add `[]` to the path, maps (additionalProperties) `{}`, like `kubectl explain` walks them.
    """
    for name, sub in (node.get("properties") or {}).items():
        sub_path = f"{path}.{name}"
        yield sub_path, name, sub
        yield from _schema_nodes(sub, sub_path)
    if isinstance(node.get("items"), dict):
        yield from _schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_nodes(node["additionalProperties"], f"{path}{{}}")


def _words(text: str) -> list[str]:
    """camelCase or prose → lower-case words: "peakLr" → ["peak", "lr"]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)
    return re.findall(r"[a-z0-9]+", spaced.lower())


def description_problems(root: dict[str, Any], path: str) -> list[str]:
    """One line per property below `root` whose description is missing or restates its name."""
    problems = []
    for sub_path, name, sub in _schema_nodes(root, path):
        text = (sub.get("description") or "").strip()
        if not text:
            problems.append(f"{sub_path}: no description")
        elif _words(text) == _words(name) or len(_words(text)) < 3:
            problems.append(f"{sub_path}: description {text!r} only restates the field name")
    return problems


def _generated_schema() -> dict[str, Any]:
    # The file kubectl applies (tests/operator/test_crd.py keeps it equal to crd.crd_yaml()).
    doc = yaml.safe_load((ROOT / "manifests" / "crd" / crd.CRD_FILE_NAME).read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("part", ["spec", "status"])
def test_every_crd_property_has_a_description(part: str) -> None:
    schema = _generated_schema()["properties"][part]
    assert len(list(_schema_nodes(schema, part))) > (100 if part == "spec" else 40)
    assert description_problems(schema, part) == []


def test_the_walker_reports_missing_and_restated_descriptions() -> None:
    schema = {
        "type": "object",
        "properties": {
            "peakLr": {"type": "number", "description": "Peak lr"},
            "stages": {
                "type": "array",
                "description": "Training stages, run in order.",
                "items": {"type": "object", "properties": {"steps": {"type": "integer"}}},
            },
            "evaluation": {
                "type": "object",
                "description": "Per evaluated stage: the evaluation Job and its scores.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"job": {"type": "string", "description": "The Job's name."}},
                },
            },
        },
    }
    assert description_problems(schema, "spec") == [
        "spec.peakLr: description 'Peak lr' only restates the field name",
        "spec.stages[].steps: no description",
    ]


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


@pytest.mark.parametrize(
    ("field", "must_say"),
    [
        # the paper's three masking strategies, by the names Table 3 gives them
        ("spec.stages[].masking.prefixProb", ["S1", "Table 3", "prefix"]),
        ("spec.stages[].masking.truncateProb", ["S2", "Table 3"]),
        ("spec.stages[].masking.blockProb", ["S3", "Table 3", "block"]),
        ("spec.stages[].masking.curriculum", ["paper-table-3", "Table 3"]),
        ("spec.stages[].optimizer.peakLr", ["learning rate", "warmup"]),
        ("spec.stages[].steps", ["Optimizer steps"]),
        ("spec.stages[].initFrom", ["final"]),
        ("spec.model.initFrom", ["Hugging Face", "gs://"]),
        ("spec.checkpoints.everySteps", ["every N"]),
        ("status.progress.tokensPerSecond", ["throughput"]),
    ],
)
def test_key_descriptions_say_what_the_field_means(field: str, must_say: list[str]) -> None:
    text = _at(_generated_schema(), field)["description"]
    for phrase in must_say:
        assert phrase.lower() in text.lower(), f"{field}: {text!r} does not mention {phrase!r}"
