"""Sampling translation: defaults fill unset fields; every bad value is refused naming its field and value."""

from __future__ import annotations

import math

import pytest

from services.common import pb
from services.common.errors import InvalidArgument
from services.teacher.sampling import EXTRA_OPTIONS, Limits, sampling_from_proto

LIMITS = Limits(max_model_len=256, max_logprobs=20, vocab_size=1024, max_n=4, default_top_k=5, default_max_tokens=32)


def test_defaults_fill_unset_fields() -> None:
    s = sampling_from_proto(pb.common.SamplingParams(), LIMITS)
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.n, s.logprobs) == (1.0, 1.0, 0, 32, 1, 5)
    explicit = sampling_from_proto(pb.common.SamplingParams(temperature=0.0, logprobs=20, n=4), LIMITS)
    assert (explicit.temperature, explicit.logprobs, explicit.n) == (0.0, 20, 4)


def test_float32_values_keep_their_digits() -> None:
    s = sampling_from_proto(pb.common.SamplingParams(temperature=0.7, top_p=0.9), LIMITS)
    assert (s.temperature, s.top_p) == (0.7, 0.9)
    assert s.to_proto().temperature == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("temperature", 11.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 5000),
        ("max_tokens", 0),
        ("max_tokens", 256),
        ("n", 0),
        ("n", 5),
        ("logprobs", 21),
        ("logprobs", 0),
        ("repetition_penalty", 0.0),
        ("min_p", 1.5),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
    ],
)
def test_out_of_range_values_name_field_and_value(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument) as err:
        sampling_from_proto(pb.common.SamplingParams(**{field: value}), LIMITS)
    assert err.value.field == f"sampling.{field}"
    assert f"sampling.{field}=" in str(err.value)


def test_stop_strings_must_be_non_empty() -> None:
    with pytest.raises(InvalidArgument, match=r"sampling\.stop="):
        sampling_from_proto(pb.common.SamplingParams(stop=["", "x"]), LIMITS)


def test_known_extra_options_are_parsed_as_json() -> None:
    msg = pb.common.SamplingParams(extra={"ignore_eos": "true", "min_tokens": "3", "stop_token_ids": "[1, 2]"})
    s = sampling_from_proto(msg, LIMITS)
    assert dict(s.extra) == {"ignore_eos": True, "min_tokens": 3, "stop_token_ids": [1, 2]}
    assert dict(s.to_proto().extra) == {"ignore_eos": "true", "min_tokens": "3", "stop_token_ids": "[1, 2]"}


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("best_of", "2", "unknown sampling option"),
        ("seed", "1", "per-request seeds"),
        ("temperature", "0.5", "typed field"),
        ("ignore_eos", "yes", "values are JSON"),
        ("min_tokens", "-1", "non-negative"),
    ],
)
def test_bad_extra_options_are_refused(name: str, value: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sampling_from_proto(pb.common.SamplingParams(extra={name: value}), LIMITS)
    assert err.value.field == f"sampling.extra[{name}]"
    assert why in str(err.value)


def test_extra_options_are_real_vllm_options() -> None:
    from vllm import SamplingParams

    fields = set(SamplingParams.__struct_fields__)
    assert set(EXTRA_OPTIONS) <= fields


def test_canonical_form_is_stable_and_sensitive() -> None:
    a = sampling_from_proto(
        pb.common.SamplingParams(temperature=0.8, extra={"min_tokens": "2", "ignore_eos": "true"}), LIMITS
    )
    b = sampling_from_proto(
        pb.common.SamplingParams(extra={"ignore_eos": "true", "min_tokens": "2"}, temperature=0.8), LIMITS
    )
    c = sampling_from_proto(pb.common.SamplingParams(temperature=0.9), LIMITS)
    assert a.canonical() == b.canonical() != c.canonical()
