"""Metric names: the services' contract, names used by PromQL queries, and names a `/metrics` endpoint exports.

The dashboard and the alert rules may only query metrics the services really export. `CONTRACT` is the list
the services were built against (ARCHITECTURE.md and the issue briefs); `exported_sample_names(url)` reads what
a running endpoint exports, so the same checks run against a real service.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

#: Metric families by type, as the services declare them (counters without their `_total`).
CONTRACT: dict[str, str] = {
    # common (services/common/metrics.py)
    "distillery_grpc_requests": "counter",
    "distillery_dead_letters": "counter",
    "distillery_reading_target_wpm": "gauge",
    "distillery_build": "info",
    # teacher
    "distillery_teacher_generated_tokens": "counter",
    "distillery_teacher_samples_published": "counter",
    "distillery_teacher_prompts_consumed": "counter",
    "distillery_teacher_batch_occupancy_ratio": "gauge",
    "distillery_teacher_requests_running": "gauge",
    "distillery_teacher_prompt_lag_records": "gauge",
    "distillery_teacher_time_to_first_token_seconds": "histogram",
    "distillery_teacher_inter_token_latency_seconds": "histogram",
    # trainer
    "distillery_trainer_tokens_trained": "counter",
    "distillery_trainer_tokens_per_second": "gauge",
    "distillery_trainer_loss": "gauge",
    "distillery_trainer_step": "gauge",
    "distillery_trainer_consumer_lag_records": "gauge",
    "distillery_trainer_samples": "counter",
    "distillery_trainer_eval_accuracy_ratio": "gauge",
    "distillery_trainer_eval_teacher_accuracy_ratio": "gauge",
    "distillery_trainer_eval_kl": "gauge",
    "distillery_trainer_eval_top1_agreement_ratio": "gauge",
    "distillery_trainer_eval_perplexity": "gauge",
    "distillery_trainer_eval_teacher_best_prompt_accuracy_ratio": "gauge",
    "distillery_trainer_eval_teacher_agreement_ratio": "gauge",
    "distillery_trainer_gate_score": "gauge",
    "distillery_trainer_on_policy_completions": "counter",
    "distillery_trainer_checkpoints_written": "counter",
    "distillery_trainer_checkpoints_promoted": "counter",
    # serving
    "distillery_serving_generated_tokens": "counter",
    "distillery_serving_stream_words_per_minute": "histogram",
    "distillery_serving_streams_below_target": "gauge",
    "distillery_serving_streams": "counter",
    "distillery_serving_time_to_first_token_seconds": "histogram",
    "distillery_serving_inter_token_latency_seconds": "histogram",
    "distillery_serving_active_streams": "gauge",
    "distillery_serving_engine_step_seconds": "gauge",
    "distillery_serving_stream_gather_tokens": "gauge",
    "distillery_serving_wpm_headroom_ratio": "gauge",
    "distillery_serving_model_version": "gauge",
    "distillery_serving_model": "info",
    "distillery_serving_swaps": "counter",
    "distillery_serving_swap_duration_seconds": "histogram",
}

#: Series Prometheus itself makes for every target.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def sample_names(family: str, kind: str) -> set[str]:
    """Series names a metric family of this type exposes (a counter `x` exposes `x_total`, ...)."""
    return {family + suffix for suffix in _SUFFIXES.get(kind, ("",))}


def contract_sample_names() -> set[str]:
    return set().union(*(sample_names(name, kind) for name, kind in CONTRACT.items()))


def parse_exposition(text: str) -> set[str]:
    """Series names in a Prometheus text exposition, including families declared without samples yet.

    A labelled metric whose label values were never used exposes only its HELP/TYPE lines, so names are derived
    from each family's type as well as read from its samples.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= sample_names(family.name, family.type)
        names |= {sample.name for sample in family.samples}
    return names


def exported_sample_names(url: str, timeout: float = 5.0) -> set[str]:
    """Scrapes a `/metrics` URL and returns the series names it exports."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_exposition(response.read().decode())


# --- PromQL ------------------------------------------------------------------------------------------------

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
    | {"atan2", "inf", "nan", "start", "end"}
)
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VARIABLES = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed); functions and keywords are not.

    A name inside `{__name__=...}` is not seen; the project's queries never select that way.
    """
    text = _GRAFANA_VARIABLES.sub(" ", expr)
    text = _STRINGS.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(name)
    return names


def names_in(exprs: Iterable[str]) -> set[str]:
    return set().union(*(metric_names(e) for e in exprs))
