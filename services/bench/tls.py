"""`distillery bench serving --tls`: serving tokens/s at 64 streams over plain text and over mTLS with a token, one run.

Two `distillery serving serve` processes on the same model and engine settings, both up for the whole run: one plain
text, one with a server certificate, client certificates required (mTLS) and the admin token checked on every call.
The load generator connects to each as clients would. After a warm-up of each, probes of `probe_s` seconds at
`streams` concurrent fixed-length streams alternate between them (plain, TLS, TLS, plain, ... `rounds` pairs), so
load from anything else on the machine falls on both alike; the ratio uses the summed tokens. Only one process has
load at a time. The certificates come from a throwaway CA made for the run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bench.serving import ServingBenchConfig, default_student, service_env
from services.common.security import AuthSettings, TlsSettings
from services.serving.loadtest import LoadtestConfig, run_loadtest
from services.serving.process import serving_process


@dataclass
class TlsBenchConfig:
    serving: ServingBenchConfig
    streams: int = 64
    probe_s: float = 10.0
    warmup_s: float = 5.0
    rounds: int = 3


def _check_environment() -> None:
    """The plain-text half must really be plain text: the service processes inherit this environment."""
    set_here = sorted(k for k in os.environ if k.startswith(("DISTILLERY_TLS_", "DISTILLERY_AUTH_")))
    if set_here:
        raise ValueError(f"unset {', '.join(set_here)}: the benchmark sets TLS and tokens itself")


def _load(config: TlsBenchConfig, address: str, tls: TlsSettings, auth: AuthSettings, seconds: float) -> LoadtestConfig:
    cfg = config.serving
    return LoadtestConfig(
        address=address,
        concurrency=config.streams,
        duration_s=seconds,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        ignore_eos=True,
        prompts=cfg.prompts,
        tls=tls,
        auth=auth,
    )


def _row(mode: str, summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("tokens_per_s", "wpm_p50", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "failed", "streams")
    return {"mode": mode, **{k: summary[k] for k in keys}}


async def run_tls_bench(config: TlsBenchConfig) -> dict[str, Any]:
    from services.common.models import prepare_default_teacher
    from services.common.pki import make_pki

    _check_environment()
    cfg = config.serving
    started = time.monotonic()
    model = cfg.student_dir
    if model is None:
        teacher = cfg.teacher_dir or prepare_default_teacher(cfg.home / "models")
        model = default_student(cfg.home / "models", teacher)
    token = secrets.token_urlsafe(32)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distillery-tls-bench-") as tmp:
        pki = make_pki(Path(tmp))
        secure_env = {
            "DISTILLERY_TLS_SERVER_CERT": str(pki.server_cert),
            "DISTILLERY_TLS_SERVER_KEY": str(pki.server_key),
            "DISTILLERY_TLS_CLIENT_CA": str(pki.ca),
            "DISTILLERY_AUTH_ADMIN_TOKEN": token,
        }
        secure_tls = TlsSettings(ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        modes = {
            "plaintext": ({}, TlsSettings(), AuthSettings()),
            "tls": (secure_env, secure_tls, AuthSettings(token=token)),
        }
        async with contextlib.AsyncExitStack() as stack:
            addresses = {}
            for mode, (env, tls, _) in modes.items():
                log = cfg.home / "bench" / f"serving-{mode}.log"
                addresses[mode] = await stack.enter_async_context(
                    serving_process({**service_env(cfg, model), **env}, log, client_tls=tls)
                )
            for mode, (_, tls, auth) in modes.items():
                if config.warmup_s > 0:
                    await run_loadtest(_load(config, addresses[mode], tls, auth, config.warmup_s))
            for i in range(config.rounds):
                # ABBA order: a drift in background load does not always favour the mode that goes first.
                for mode in ("plaintext", "tls") if i % 2 == 0 else ("tls", "plaintext"):
                    _, tls, auth = modes[mode]
                    result = await run_loadtest(_load(config, addresses[mode], tls, auth, config.probe_s))
                    runs.append(_row(mode, result.summary()))
    plain = sum(r["tokens_per_s"] or 0 for r in runs if r["mode"] == "plaintext")
    secure = sum(r["tokens_per_s"] or 0 for r in runs if r["mode"] == "tls")
    return {
        "streams": config.streams,
        "plaintext_tokens_per_s": round(plain / config.rounds, 1),
        "tls_tokens_per_s": round(secure / config.rounds, 1),
        "tls_to_plaintext_ratio": round(secure / plain, 3) if plain else None,
        "tls_cost_percent": round(100 * (1 - secure / plain), 1) if plain else None,
        "tls_mode": "TLS (gRPC defaults), client certificates required (mTLS), the admin bearer token on every call",
        "model": str(model),
        "runs": runs,
        "config": {
            "probe_s": config.probe_s,
            "warmup_s": config.warmup_s,
            "rounds": config.rounds,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "enforce_eager": cfg.enforce_eager,
            "kv_cache_gib": cfg.kv_cache_gib,
        },
        "cpus": len(os.sched_getaffinity(0)),
        "seconds": round(time.monotonic() - started, 1),
    }
