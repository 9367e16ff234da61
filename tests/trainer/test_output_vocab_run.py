"""A run with `student.output_vocab_coverage` on (the trainer service in-process, the real broker, the tiny teacher's
samples): its loss falls, its checkpoints are in the restricted-vocabulary format, and the coverage figures are
reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.common import outvocab, pb
from services.common.models import load_causal_lm, load_tokenizer
from services.common.registry import path_from_uri
from services.common.settings import KafkaSettings
from services.trainer.generation import complete
from tests.trainer.conftest import tiny_spec
from tests.trainer.samples import publish


async def test_a_run_with_a_restricted_output_vocabulary_trains_and_writes_the_format(
    stub: Any, tiny_samples: list, kafka_settings: KafkaSettings
) -> None:
    publish(kafka_settings, tiny_samples)
    spec = tiny_spec("restricted", max_steps=30, eval_every_steps=10, sample_reuse=20)
    spec.student.output_vocab_coverage = 0.9
    spec.loss.CopyFrom(pb.trainer.LossSpec(forward_kl=1.0, cross_entropy=0.5, reference_ce=1.0))
    spec.gate.min_accuracy_ratio = 0.0  # the tiny teacher is never right: the gate passes on accuracy 0
    spec.gate.must_beat_promoted = False
    await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
    seen = [r.progress async for r in stub.WatchRun(pb.trainer.WatchRunRequest(run_id="restricted"))]
    final = seen[-1]
    assert final.state == pb.trainer.RUN_STATE_SUCCEEDED, final.error
    losses = [p.loss for p in seen if p.step > 0]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.9, (first, last)
    assert final.last_eval.HasField("kl") and final.last_eval.HasField("perplexity")

    listed = (await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(run_id="restricted"))).checkpoints
    assert [c.step for c in listed] == [10, 20, 30]
    m = listed[-1].metrics
    vocab_size = len(load_tokenizer(path_from_uri(listed[-1].registry_uri)))
    assert 0 < m["output_vocab_size"] < vocab_size and m["output_vocab_size"] % outvocab.ROW_MULTIPLE == 0
    assert 0.0 < m["output_vocab_coverage"] <= 1.0  # of the selection samples' answer tokens
    assert 0.0 <= m["output_vocab_heldout_coverage"] <= 1.0
    assert m["tokens_outside_head"] == final.tokens_outside_head >= 0
    assert all(c.metrics["output_vocab_size"] == m["output_vocab_size"] for c in listed)
    assert listed[-1].parameter_count == final_parameters(path_from_uri(listed[-1].registry_uri))

    folder = path_from_uri(listed[-1].registry_uri)
    config = json.loads((folder / "config.json").read_text())
    assert config["output_vocab_size"] == m["output_vocab_size"]
    assert config["architectures"] == [outvocab.ARCHITECTURE] and not config["tie_word_embeddings"]
    model = load_causal_lm(folder, dtype=torch.float32).eval()
    head = set(model.lm_head.token_ids.tolist())
    assert len(head) == m["output_vocab_size"]
    held = [list(s.prompt_token_ids) for s in tiny_samples if s.split == pb.common.SPLIT_EVAL]
    rows = complete(model, load_tokenizer(folder), held, 12, False, temperature=1.0)
    assert all(t in head for row in rows for t in row)


def final_parameters(folder: Path) -> int:
    """Trained parameters of a checkpoint folder: embedding, decoder and the head's N rows (not its id map)."""
    return sum(p.numel() for p in load_causal_lm(folder).parameters())
