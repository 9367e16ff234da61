"""The distillery Grafana dashboard, as code (grafana-foundation-sdk); writes `distillery.json` beside this file.

    python deploy/grafana/dashboard.py           # regenerate distillery.json
    python deploy/grafana/dashboard.py --check   # exit 1 when the committed JSON is stale

Every query names only metrics the services export (tests/deploy checks that). Queries filter on a `namespace`
variable whose "All" value also matches series without a namespace label, so the dashboard works on Kubernetes
and on a plain Prometheus alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

HERE = Path(__file__).resolve().parent
TARGET = HERE / "distillery.json"
UID = "distillery-overview"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


# --- small helpers -----------------------------------------------------------------------------------------


def query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def quantile(q: float, histogram: str, by: str = "") -> str:
    """PromQL for the q-quantile of a histogram over all replicas (optionally kept apart `by` labels)."""
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({histogram}_bucket{{{NS}}}[{RATE}])))"


def series(title: str, description: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
        .span(12)
        .height(8)
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def single(title: str, description: str, unit: str, expr: str, legend: str = "") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(query(expr, legend, "A").instant())
        .span(6)
        .height(4)
    )


def dashed_red(ref: str) -> list[dm.DynamicConfigValue]:
    """Overrides that draw query `ref` as a dashed red reference line without fill."""
    return [
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
    ]


# --- panels ------------------------------------------------------------------------------------------------


def overview_row(d: db.Dashboard) -> db.Dashboard:
    return (
        d.with_row(db.Row("Overview"))
        .with_panel(
            single(
                "Median stream speed",
                "Words per minute of the median stream over the dashboard's rate window; the target is the "
                "distillery_reading_target_wpm gauge (238 wpm).",
                "none",
                quantile(0.5, "distillery_serving_stream_words_per_minute"),
                "p50 wpm",
            )
        )
        .with_panel(
            single(
                "Streams below target now",
                "Open streams currently slower than the reading target.",
                "none",
                f"sum(distillery_serving_streams_below_target{{{NS}}})",
            )
        )
        .with_panel(
            single(
                "Model version served",
                "Registry version of the student the serving replicas run (highest across replicas).",
                "none",
                f"max(distillery_serving_model_version{{{NS}}})",
            )
        )
        .with_panel(
            single(
                "Services up",
                "Scrape targets of the teacher, trainer and serving jobs that answer.",
                "none",
                f'sum(up{{job=~"teacher|trainer|serving", {NS}}})',
            )
        )
    )


def throughput_row(d: db.Dashboard) -> db.Dashboard:
    tokens = series(
        "Tokens per second by service",
        "Teacher: tokens generated. Trainer: tokens trained on. Serving: student tokens streamed to clients.",
        "short",
        query(f"sum(rate(distillery_teacher_generated_tokens_total{{{NS}}}[{RATE}]))", "teacher (generated)", "A"),
        query(f"sum(rate(distillery_trainer_tokens_trained_total{{{NS}}}[{RATE}]))", "trainer (trained)", "B"),
        query(f"sum(rate(distillery_serving_generated_tokens_total{{{NS}}}[{RATE}]))", "serving (generated)", "C"),
    )
    versus = series(
        "Teacher vs student throughput per replica",
        "Tokens per second one replica generates: the teacher model against the distilled student.",
        "short",
        query(
            f"avg(sum by (instance) (rate(distillery_teacher_generated_tokens_total{{{NS}}}[{RATE}])))",
            "teacher per replica",
            "A",
        ),
        query(
            f"avg(sum by (instance) (rate(distillery_serving_generated_tokens_total{{{NS}}}[{RATE}])))",
            "student per replica",
            "B",
        ),
        query(
            f"avg(sum by (instance) (rate(distillery_serving_generated_tokens_total{{{NS}}}[{RATE}])))"
            f" / avg(sum by (instance) (rate(distillery_teacher_generated_tokens_total{{{NS}}}[{RATE}])))",
            "student ÷ teacher",
            "C",
        ),
    ).override_by_name("student ÷ teacher", [dm.DynamicConfigValue(id_val="unit", value="suffix:×")])
    return d.with_row(db.Row("Throughput")).with_panel(tokens).with_panel(versus)


def streams_row(d: db.Dashboard) -> db.Dashboard:
    wpm = series(
        "Words per minute per stream",
        "Percentiles over streams of their speed in words per minute; the dashed line is the reading target "
        "read from the distillery_reading_target_wpm gauge.",
        "none",
        query(quantile(0.1, "distillery_serving_stream_words_per_minute"), "p10 (slowest streams)", "A"),
        query(quantile(0.5, "distillery_serving_stream_words_per_minute"), "p50", "B"),
        query(quantile(0.9, "distillery_serving_stream_words_per_minute"), "p90", "C"),
        query(f"max(distillery_reading_target_wpm{{{NS}}})", "reading target", "D"),
    ).override_by_query("D", dashed_red("D"))
    headroom = (
        series(
            "Words-per-minute headroom by replica",
            "Median speed of each replica's open streams over the reading target "
            "(distillery_serving_wpm_headroom_ratio; idle replicas export +Inf and draw nothing). Below the dashed "
            "line at 1 its readers wait; the KEDA autoscaler (deploy/k8s/components/keda) adds replicas while the "
            "average of 1/headroom is above 0.8.",
            "none",
            query(f"distillery_serving_wpm_headroom_ratio{{{NS}}} < +Inf", "{{instance}}", "A"),
        )
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=None, color="red"), dm.Threshold(value=1.0, color="green")])
        )
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.DASHED))
    )
    active = (
        series(
            "Active streams",
            "Open Generate streams per serving replica, and those currently below the reading target.",
            "short",
            query(f"sum by (instance) (distillery_serving_active_streams{{{NS}}})", "{{instance}}", "A"),
            query(f"sum(distillery_serving_streams_below_target{{{NS}}})", "below target (all replicas)", "B"),
        )
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NONE))
        .span(8)
    )
    ttft = series(
        "Time to first token",
        "Serving and teacher time to first token, p50 and p99.",
        "s",
        query(quantile(0.5, "distillery_serving_time_to_first_token_seconds"), "serving p50", "A"),
        query(quantile(0.99, "distillery_serving_time_to_first_token_seconds"), "serving p99", "B"),
        query(quantile(0.5, "distillery_teacher_time_to_first_token_seconds"), "teacher p50", "C"),
        query(quantile(0.99, "distillery_teacher_time_to_first_token_seconds"), "teacher p99", "D"),
    ).span(8)
    itl = series(
        "Inter-token latency",
        "Time between consecutive tokens of one stream, p50 and p99 (60 / (tokens per word × wpm) at target).",
        "s",
        query(quantile(0.5, "distillery_serving_inter_token_latency_seconds"), "serving p50", "A"),
        query(quantile(0.99, "distillery_serving_inter_token_latency_seconds"), "serving p99", "B"),
        query(quantile(0.5, "distillery_teacher_inter_token_latency_seconds"), "teacher p50", "C"),
        query(quantile(0.99, "distillery_teacher_inter_token_latency_seconds"), "teacher p99", "D"),
    ).span(8)
    outcomes = series(
        "Stream outcomes and errors",
        "Finished streams per second by result, and the share of gRPC requests that failed (not OK or "
        "CANCELLED) per service.",
        "short",
        query(f"sum by (result) (rate(distillery_serving_streams_total{{{NS}}}[{RATE}]))", "streams {{result}}", "A"),
        query(
            f'sum by (service) (rate(distillery_grpc_requests_total{{code!~"OK|CANCELLED", {NS}}}[{RATE}]))'
            f" / sum by (service) (rate(distillery_grpc_requests_total{{{NS}}}[{RATE}]))",
            "error ratio {{service}}",
            "B",
        ),
    ).override_by_regexp("error ratio .*", [dm.DynamicConfigValue(id_val="unit", value="percentunit")])
    gathering = (
        series(
            "Engine step and tokens per output",
            "Per serving replica: the engine's time per token of one stream (left) and how many tokens vLLM "
            "gathers before it builds an output for a new stream under the stream interval (right; 1: an output "
            "at every step). N rises as steps get shorter, up to stream_gather_max_tokens.",
            "s",
            query(f"max by (instance) (distillery_serving_engine_step_seconds{{{NS}}})", "step {{instance}}", "A"),
            query(f"max by (instance) (distillery_serving_stream_gather_tokens{{{NS}}})", "N {{instance}}", "B"),
        )
        .override_by_query(
            "B",
            [
                dm.DynamicConfigValue(id_val="unit", value="short"),
                dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            ],
        )
        .span(12)
    )
    return (
        d.with_row(db.Row("Streams"))
        .with_panel(wpm)
        .with_panel(headroom)
        .with_panel(active)
        .with_panel(ttft)
        .with_panel(itl)
        .with_panel(outcomes.span(12))
        .with_panel(gathering)
    )


def training_row(d: db.Dashboard) -> db.Dashboard:
    loss = series(
        "Trainer loss",
        "Latest training loss by component (total, forward/reverse KL, JSD, skew KL, cross-entropy, ...).",
        "none",
        query(f"max by (component) (distillery_trainer_loss{{{NS}}})", "{{component}}", "A"),
    )
    accuracy = series(
        "Evaluation: accuracy and agreement",
        "Held-out task accuracy of the student and of the teacher, and how often the student's top token is "
        "the teacher's.",
        "percentunit",
        query(f"max(distillery_trainer_eval_accuracy_ratio{{{NS}}})", "student accuracy", "A"),
        query(f"max(distillery_trainer_eval_teacher_accuracy_ratio{{{NS}}})", "teacher accuracy", "B"),
        query(f"max(distillery_trainer_eval_top1_agreement_ratio{{{NS}}})", "top-1 agreement", "C"),
    ).span(8)
    divergence = series(
        "Evaluation: KL and perplexity",
        "KL divergence from teacher to student on held-out samples, and the student's perplexity.",
        "none",
        query(f"max(distillery_trainer_eval_kl{{{NS}}})", "KL(teacher ‖ student)", "A"),
        query(f"max(distillery_trainer_eval_perplexity{{{NS}}})", "perplexity", "B"),
    ).span(8)
    progress = series(
        "Training progress",
        "Trainer tokens per second and optimizer step.",
        "short",
        query(f"sum(distillery_trainer_tokens_per_second{{{NS}}})", "tokens/s", "A"),
        query(f"max(distillery_trainer_step{{{NS}}})", "step", "B"),
    ).span(8)
    lag = series(
        "Consumer lag",
        "Records not yet consumed: teacher samples waiting for the trainer, prompts waiting for the teacher.",
        "short",
        query(f"sum(distillery_trainer_consumer_lag_records{{{NS}}})", "trainer (teacher samples)", "A"),
        query(f"sum(distillery_teacher_prompt_lag_records{{{NS}}})", "teacher (prompts)", "B"),
    )
    samples = series(
        "Samples and dead letters",
        "Teacher samples the trainer handled per second by result; records sent to the dead-letter topic.",
        "short",
        query(f"sum by (result) (rate(distillery_trainer_samples_total{{{NS}}}[{RATE}]))", "{{result}}", "A"),
        query(f"sum(rate(distillery_teacher_samples_published_total{{{NS}}}[{RATE}]))", "published by teacher", "B"),
        query(f"sum by (topic) (rate(distillery_dead_letters_total{{{NS}}}[{RATE}]))", "dead letters {{topic}}", "C"),
    )
    teacher = series(
        "Teacher batch",
        "Requests the teacher's engine runs at once, as a share of its max_num_seqs, and prompts consumed.",
        "short",
        query(f"avg(distillery_teacher_batch_occupancy_ratio{{{NS}}})", "batch occupancy", "A"),
        query(f"sum(distillery_teacher_requests_running{{{NS}}})", "requests running", "B"),
        query(f"sum(rate(distillery_teacher_prompts_consumed_total{{{NS}}}[{RATE}]))", "prompts consumed/s", "C"),
    ).override_by_name("batch occupancy", [dm.DynamicConfigValue(id_val="unit", value="percentunit")])
    return (
        d.with_row(db.Row("Training"))
        .with_panel(loss)
        .with_panel(lag)
        .with_panel(accuracy)
        .with_panel(divergence)
        .with_panel(progress)
        .with_panel(samples)
        .with_panel(teacher)
    )


def models_row(d: db.Dashboard) -> db.Dashboard:
    swaps = (
        series(
            "Model swaps",
            "Hot swaps across the serving replicas by result (ok, failed, ignored) in each interval.",
            "short",
            query(f"sum by (result) (increase(distillery_serving_swaps_total{{{NS}}}[{RATE}]))", "{{result}}", "A"),
        )
        .draw_style(cm.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .override_by_name(
            "failed", [dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"})]
        )
        .span(8)
    )
    version = series(
        "Model version by replica",
        "Registry version each serving replica runs; steps show swaps rolling through the replicas.",
        "none",
        query(f"max by (instance) (distillery_serving_model_version{{{NS}}})", "{{instance}}", "A"),
    ).span(8)
    checkpoints = (
        series(
            "Checkpoints and swap duration",
            "Checkpoints the trainer wrote and promoted per interval; time a swap takes (p50, p99).",
            "short",
            query(f"sum(increase(distillery_trainer_checkpoints_written_total{{{NS}}}[{RATE}]))", "written", "A"),
            query(f"sum(increase(distillery_trainer_checkpoints_promoted_total{{{NS}}}[{RATE}]))", "promoted", "B"),
            query(quantile(0.5, "distillery_serving_swap_duration_seconds"), "swap p50", "C"),
            query(quantile(0.99, "distillery_serving_swap_duration_seconds"), "swap p99", "D"),
        )
        .override_by_regexp("swap p.*", [dm.DynamicConfigValue(id_val="unit", value="s")])
        .span(8)
    )
    return d.with_row(db.Row("Models")).with_panel(swaps).with_panel(version).with_panel(checkpoints)


# --- dashboard ---------------------------------------------------------------------------------------------


def build() -> dict[str, Any]:
    datasource = db.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        db.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query("label_values(distillery_reading_target_wpm, namespace)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        # Also matches series without a namespace label (a plain Prometheus outside Kubernetes).
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )
    d = (
        db.Dashboard("Distillery")
        .uid(UID)
        .description("Teacher → trainer → serving: throughput, reading speed against 238 wpm, training, models.")
        .tags(["distillery", "llm", "distillation"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(datasource)
        .with_variable(namespace)
    )
    for row in (overview_row, throughput_row, streams_row, training_row, models_row):
        d = row(d)
    built: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return built


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET.name} is stale: run `python deploy/grafana/dashboard.py`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
