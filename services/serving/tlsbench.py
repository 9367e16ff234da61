"""`distillery bench serving --tls`: serving tokens/s at 64 streams over plain text and over mTLS with a token, one run.

Two `distillery serving serve` processes in turn, on the same model and engine settings: the first plain text, the
second with a server certificate, client certificates required (mTLS) and the admin token checked on every call; the
load generator connects to each the same way clients would. Each gets a short warm-up, then one measured probe of
`probe_s` seconds at `streams` concurrent fixed-length streams; with `rounds` > 1 the pair repeats (plain, TLS, plain,
TLS, ...) and the ratio uses the sums. The certificates are a throwaway CA made for the run.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.security import AuthSettings, TlsSettings
from services.serving.bench import ServingBenchConfig, default_student, service_env
from services.serving.loadtest import LoadtestConfig, run_loadtest
from services.serving.process import serving_process


@dataclass
class TlsBenchConfig:
    serving: ServingBenchConfig
    streams: int = 64
    probe_s: float = 30.0
    warmup_s: float = 5.0
    rounds: int = 1


def _check_environment() -> None:
    """The plain-text half must really be plain text: the service processes inherit this environment."""
    set_here = sorted(k for k in os.environ if k.startswith(("DISTILLERY_TLS_", "DISTILLERY_AUTH_")))
    if set_here:
        raise ValueError(f"unset {', '.join(set_here)}: the benchmark sets TLS and tokens itself")


async def _measure(
    config: TlsBenchConfig, model: Path, env: dict[str, str], tls: TlsSettings, auth: AuthSettings, name: str
) -> dict[str, Any]:
    cfg = config.serving
    log = cfg.home / "bench" / f"serving-{name}.log"
    started = time.monotonic()
    async with serving_process({**service_env(cfg, model), **env}, log, client_tls=tls) as address:
        start_s = time.monotonic() - started

        def load(duration_s: float) -> LoadtestConfig:
            return LoadtestConfig(
                address=address,
                concurrency=config.streams,
                duration_s=duration_s,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                ignore_eos=True,
                prompts=cfg.prompts,
                tls=tls,
                auth=auth,
            )

        if config.warmup_s > 0:
            await run_loadtest(load(config.warmup_s))
        summary = (await run_loadtest(load(config.probe_s))).summary()
    keys = ("tokens_per_s", "wpm_p50", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "failed", "streams")
    return {"mode": name, "engine_start_s": round(start_s, 1), **{k: summary[k] for k in keys}}


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
        for _ in range(config.rounds):
            runs.append(await _measure(config, model, {}, TlsSettings(), AuthSettings(), "plaintext"))
            runs.append(await _measure(config, model, secure_env, secure_tls, AuthSettings(token=token), "tls"))
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
