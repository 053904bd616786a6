"""One sampler-settings model (`coda_trainer.config.SamplerSettings`), every surface derived from
it: the HTTP requests' per-request overrides, the server's defaults, the CRD's
`spec.sampler.defaults` and `spec.evaluation.sampler`, both CLIs' flags and the evaluation Job's
command. Each test fails when a surface lacks a field of the model or bounds it differently."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from coda_operator import api, render
from coda_trainer.config import (
    SAMPLER_PRESETS,
    SamplerKnobs,
    SamplerSettings,
    resolve_sampler_settings,
    sampler_flag,
    sampler_settings_from_args,
)
from operator_testkit import run_spec
from pydantic.alias_generators import to_camel

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "manifests" / "crd" / "codatrainingruns.coda.dev.yaml"
FIELDS = dict(SamplerSettings.model_fields)


def _bounds(field: Any) -> dict[str, float]:
    """The numeric constraints of a pydantic field: {'ge': 1, 'le': 4096, ...}."""
    out: dict[str, float] = {}
    for m in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


def _choices(field: Any) -> list[str] | None:
    if typing.get_origin(field.annotation) is Literal:
        return list(typing.get_args(field.annotation))
    for arg in typing.get_args(field.annotation):
        if typing.get_origin(arg) is Literal:
            return list(typing.get_args(arg))
    return None


def _kind(field: Any) -> type:
    return next(a for a in typing.get_args(field.annotation) if a is not type(None))


def _valid_value(field: Any) -> Any:
    choices = _choices(field)
    if choices:
        return choices[-1]
    b = _bounds(field)
    low = b.get("ge", b.get("gt", 0))
    return _kind(field)(low + 1 if "le" not in b or low + 1 <= b["le"] else b["le"])


def _invalid_values(field: Any) -> list[Any]:
    """Just outside each bound (and a non-choice)."""
    if _choices(field):
        return ["no-such-choice"]
    b, kind, out = _bounds(field), _kind(field), []
    if "ge" in b:
        out.append(kind(b["ge"] - 1))
    if "gt" in b:
        out.append(kind(b["gt"]))
    if "le" in b:
        out.append(kind(b["le"] + 1))
    return out


def test_every_knob_is_bounded_or_a_choice() -> None:
    # Bounds are what the other tests compare; a numeric knob without any would compare nothing.
    for name, field in FIELDS.items():
        assert _choices(field) or _bounds(field), name
        assert field.description, name


def test_http_requests_carry_every_knob_with_the_same_bounds() -> None:
    from coda_trainer.serve import schemas

    for model in (schemas.CompletionRequest, schemas.ChatCompletionRequest, schemas.InfillRequest):
        fields = model.model_fields
        for name in SamplerKnobs.model_fields:
            assert name in fields, (model.__name__, name)
            assert fields[name].annotation == FIELDS[name].annotation, (model.__name__, name)
            assert _bounds(fields[name]) == _bounds(FIELDS[name]), (model.__name__, name)
            assert fields[name].default is None, (model.__name__, name)
        # A request's length is OpenAI's max_tokens: the bounds of max_new_tokens.
        assert _bounds(fields["max_tokens"]) == _bounds(FIELDS["max_new_tokens"]), model.__name__


def test_server_defaults_are_the_settings_model() -> None:
    from coda_trainer.serve.engine import ServeSettings

    assert type(ServeSettings().defaults) is SamplerSettings


def _crd_sampler_schemas() -> dict[str, dict[str, Any]]:
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return {
        "spec.sampler.defaults": spec["sampler"]["properties"]["defaults"],
        "spec.evaluation.sampler": spec["evaluation"]["properties"]["sampler"],
    }


@pytest.mark.parametrize("where", ["spec.sampler.defaults", "spec.evaluation.sampler"])
def test_the_crd_has_every_field_with_the_same_bounds(where: str) -> None:
    props = _crd_sampler_schemas()[where]["properties"]
    assert set(props) == {to_camel(n) for n in FIELDS}, where
    for name, field in FIELDS.items():
        prop, b = props[to_camel(name)], _bounds(field)
        assert prop.get("enum") == _choices(field), name
        assert prop.get("minimum") == b.get("ge", b.get("gt")), name
        assert bool(prop.get("exclusiveMinimum")) == ("gt" in b), name
        assert prop.get("maximum") == b.get("le"), name
        assert prop["description"] == field.description, name
    # The operator's models are the trainer's model, not a copy.
    assert api.SamplerDefaults is SamplerSettings


def _serve_args(argv: list[str]) -> Any:
    from coda_trainer.serve.__main__ import parse_args

    return parse_args(["--checkpoint", "x", *argv])


def _eval_args(argv: list[str]) -> Any:
    from coda_trainer.evaluate.__main__ import parse_args

    return parse_args(["--benchmark", "humaneval", "--reference", *argv])


@pytest.mark.parametrize("parse", [_serve_args, _eval_args], ids=["serve", "evaluate"])
def test_both_clis_have_a_flag_per_field_with_the_same_bounds(parse: Any) -> None:
    for name, field in FIELDS.items():
        value = _valid_value(field)
        got = sampler_settings_from_args(parse([sampler_flag(name), str(value)]))
        assert got == SamplerSettings(**{name: value}), name
        for bad in _invalid_values(field):
            with pytest.raises(SystemExit):
                parse([sampler_flag(name), str(bad)])
    assert sampler_settings_from_args(parse([])) == SamplerSettings()


def test_the_eval_jobs_flags_are_the_harness_flags_for_every_field() -> None:
    from coda_trainer.evaluate.__main__ import parse_args

    every = {to_camel(n): _valid_value(f) for n, f in FIELDS.items()}
    spec = api.parse_spec(run_spec(evaluation={"benchmarks": ["humaneval"], "sampler": every}))
    command = render.eval_command(spec, "sft")
    assert command[:3] == ["python", "-m", "coda_trainer.evaluate"]
    # The harness parses the Job's command back into the spec's settings, field for field.
    args = parse_args(command[3:])
    assert sampler_settings_from_args(args) == spec.evaluation.sampler
    assert spec.evaluation.sampler == SamplerSettings(
        **{n: _valid_value(f) for n, f in FIELDS.items()}
    )


# ---- presets and the resolution order ----


def test_presets_set_exactly_their_four_knobs_and_explicit_knobs_win() -> None:
    for name, preset in SAMPLER_PRESETS.items():
        got = resolve_sampler_settings(SamplerSettings(preset=name))
        assert (got.steps, got.block_length, got.threshold, got.cache) == (
            preset.steps, preset.block_length, preset.threshold, preset.cache,
        )  # fmt: skip
        assert got.alg == "entropy" and got.temperature == 0.0 and got.preset is None
    server = SamplerSettings(preset="fast", steps=64, top_k=0)
    assert resolve_sampler_settings(server).steps == 64  # the layer's own knob beats its preset
    assert resolve_sampler_settings(server).top_k is None  # 0 = off, for the sampler None
    # A request's preset replaces the server's, None values included (quality: one block).
    request = SamplerKnobs(preset="quality")
    got = resolve_sampler_settings(server, request)
    assert (got.steps, got.block_length, got.threshold, got.cache) == (None, None, None, "none")
    got = resolve_sampler_settings(server, SamplerKnobs(preset="quality", cache="prefix"))
    assert got.cache == "prefix"
    # A request without a preset keeps the server's preset and knobs.
    got = resolve_sampler_settings(server, SamplerKnobs(temperature=0.5))
    assert (got.steps, got.block_length, got.cache, got.temperature) == (64, 32, "dual", 0.5)


def test_the_decode_config_accepts_every_resolved_setting() -> None:
    # SamplingConfig (the compiled sampler's config) is internal: it may accept more than users may
    # set, never less. top_k 0 ("off") reaches it as None.
    from coda_trainer.sampling import SamplingConfig

    for name, field in FIELDS.items():
        if name == "preset":
            continue
        decode = SamplingConfig.model_fields[name]
        assert _choices(decode) == _choices(field), name
        user, inner = _bounds(field), _bounds(decode)
        user_low = user.get("ge", user.get("gt"))
        if name == "top_k":
            user_low = 1  # 0 is resolved to None
        if "ge" in inner:
            assert user_low is not None and user_low >= inner["ge"], name
        if "gt" in inner:
            assert user_low is not None and (user_low > inner["gt"] or "gt" in user), name
        if "le" in inner:
            assert user.get("le") is not None and user["le"] <= inner["le"], name
    assert resolve_sampler_settings(SamplerSettings(top_k=0)).top_k is None
