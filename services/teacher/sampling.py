"""Sampling settings: the proto → domain translation with validation, shared by the gRPC servicer and the worker.

Unset proto fields take the service defaults, so a `Sampling` is always complete: it is what the engine runs,
what a teacher sample records, and what its deterministic id hashes. Every refusal names the field and value.
Options beyond the typed fields travel in `SamplingParams.extra` (name → JSON value); only the vLLM options
listed in `EXTRA_OPTIONS` are accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import pb
from services.common.errors import InvalidArgument
from services.common.prompt_size import PromptSize

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and the defaults for what it leaves unset."""

    max_model_len: int
    max_logprobs: int
    vocab_size: int
    max_n: int = 16
    default_top_k: int = 20
    default_max_tokens: int = 256
    default_temperature: float = 1.0
    prompt_size: PromptSize = field(default_factory=PromptSize)


@dataclass(frozen=True)
class Sampling:
    """Complete sampling settings of one request (no unset fields)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    n: int
    logprobs: int
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Parsed extra vLLM options, sorted by name.
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def to_proto(self) -> pb.common.SamplingParams:
        """The effective settings with every field set (what a teacher sample records)."""
        return pb.common.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            n=self.n,
            logprobs=self.logprobs,
            stop=list(self.stop),
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            extra={name: json.dumps(value, sort_keys=True) for name, value in self.extra},
        )

    def canonical(self) -> str:
        """A stable text form: equal settings give equal text (hashed into sample ids)."""
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data["stop"] = list(self.stop)
        data["extra"] = {name: value for name, value in self.extra}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _parse_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _parse_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError("expected a JSON list of token ids")
    return value


def _parse_strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a JSON list of non-empty strings")
    return value


def _parse_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object {"token_id": bias}')
    try:
        out = {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ValueError('expected a JSON object {"token_id": bias}') from None
    if not all(math.isfinite(v) and -100 <= v <= 100 for v in out.values()):
        raise ValueError("biases must be finite, in [-100, 100]")
    return out


#: vLLM `SamplingParams` options accepted in `SamplingParams.extra`, with their value parsers.
EXTRA_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "min_tokens": _parse_int,
    "ignore_eos": _parse_bool,
    "stop_token_ids": _parse_ids,
    "allowed_token_ids": _parse_ids,
    "bad_words": _parse_strings,
    "logit_bias": _parse_bias,
    "skip_special_tokens": _parse_bool,
    "spaces_between_special_tokens": _parse_bool,
    "include_stop_str_in_output": _parse_bool,
}
#: Names a client might try in `extra` that the service sets itself or refuses, with the reason.
REFUSED_OPTIONS = {
    "seed": "per-request seeds are not supported (the engine is seeded: vllm.seed)",
    "prompt_logprobs": "use the Score RPC",
    "output_kind": "set by the service",
    "detokenize": "set by the service",
    "flat_logprobs": "set by the service",
    "logprobs_mode": "an engine setting",
}


def _parse_extra(extra: Mapping[str, str], prefix: str) -> tuple[tuple[str, Any], ...]:
    typed = set(pb.common.SamplingParams.DESCRIPTOR.fields_by_name) - {"extra"}
    out = []
    for name in sorted(extra):
        where = f"{prefix}.extra[{name}]"
        if name in typed:
            raise InvalidArgument(where, extra[name], f"use the typed field {prefix}.{name}")
        if name in REFUSED_OPTIONS:
            raise InvalidArgument(where, extra[name], REFUSED_OPTIONS[name])
        parser = EXTRA_OPTIONS.get(name)
        if parser is None:
            raise InvalidArgument(where, name, f"unknown sampling option; known: {', '.join(sorted(EXTRA_OPTIONS))}")
        try:
            value = parser(json.loads(extra[name]))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(where, extra[name], f"{exc} (values are JSON)") from None
        out.append((name, value))
    return tuple(out)


def _f32(value: Any) -> float:
    """Proto floats are float32: 0.7 arrives as 0.699999988; keep the digits the client meant."""
    return float(f"{float(value):.7g}")


def _check_range(where: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(where, value, f"must be in {bracket}{low}, {high}]")


def sampling_from_proto(msg: pb.common.SamplingParams, limits: Limits, prefix: str = "sampling") -> Sampling:
    """Validates a request's sampling settings and fills in the defaults; raises `InvalidArgument`."""

    def get(name: str, default: Any) -> Any:
        return getattr(msg, name) if msg.HasField(name) else default  # type: ignore[arg-type]

    temperature = _f32(get("temperature", limits.default_temperature))
    _check_range(f"{prefix}.temperature", temperature, 0.0, 10.0)
    top_p = _f32(get("top_p", 1.0))
    _check_range(f"{prefix}.top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = int(get("top_k", 0))
    if top_k < -1 or top_k > limits.vocab_size:
        raise InvalidArgument(f"{prefix}.top_k", top_k, f"must be 0 or -1 (off) or in [1, {limits.vocab_size}]")
    max_tokens = int(get("max_tokens", min(limits.default_max_tokens, limits.max_model_len - 1)))
    if not 1 <= max_tokens < limits.max_model_len:
        raise InvalidArgument(f"{prefix}.max_tokens", max_tokens, f"must be in [1, {limits.max_model_len - 1}]")
    n = int(get("n", 1))
    if not 1 <= n <= limits.max_n:
        raise InvalidArgument(f"{prefix}.n", n, f"must be in [1, {limits.max_n}]")
    logprobs = int(get("logprobs", min(limits.default_top_k, limits.max_logprobs)))
    if not 1 <= logprobs <= limits.max_logprobs:
        raise InvalidArgument(f"{prefix}.logprobs", logprobs, f"top-k logprobs must be in [1, {limits.max_logprobs}]")
    stop = tuple(msg.stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise InvalidArgument(f"{prefix}.stop", list(stop), f"at most {MAX_STOP_STRINGS} non-empty strings")
    repetition_penalty = _f32(get("repetition_penalty", 1.0))
    _check_range(f"{prefix}.repetition_penalty", repetition_penalty, 0.0, 10.0, low_open=True)
    min_p = _f32(get("min_p", 0.0))
    _check_range(f"{prefix}.min_p", min_p, 0.0, 1.0)
    presence_penalty = _f32(get("presence_penalty", 0.0))
    _check_range(f"{prefix}.presence_penalty", presence_penalty, -2.0, 2.0)
    frequency_penalty = _f32(get("frequency_penalty", 0.0))
    _check_range(f"{prefix}.frequency_penalty", frequency_penalty, -2.0, 2.0)
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        n=n,
        logprobs=logprobs,
        stop=stop,
        repetition_penalty=repetition_penalty,
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        extra=_parse_extra(msg.extra, prefix),
    )
