"""`distillery prompts publish FILE.jsonl` against the real broker: bad lines named by number, good ones published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.common import pb
from services.common.settings import KafkaSettings
from tests.teacher.conftest import read_topic


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt_id": "a", "messages": [{"role": "user", "content": "1+1?"}], "reference_answer": "2"}),
        json.dumps({"prompt_id": "b"}),
        json.dumps({"prompt_id": "c", "text": "hello", "split": "eval", "sampling": {"n": 2}}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_publish_refuses_a_file_with_bad_lines_then_skips_them_on_request(
    prompts_file: Path, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_KAFKA_BOOTSTRAP", str(kafka_settings.bootstrap))
    monkeypatch.setenv("DISTILLERY_KAFKA_TOPIC_PROMPTS", kafka_settings.topic_prompts)
    runner = CliRunner()
    refused = runner.invoke(app, ["prompts", "publish", str(prompts_file)])
    assert refused.exit_code == 1
    assert f"{prompts_file}:2:" in refused.output and "nothing published" in refused.output

    published = runner.invoke(app, ["prompts", "publish", str(prompts_file), "--skip-bad"])
    assert published.exit_code == 0, published.output
    summary = json.loads(published.stdout.strip().splitlines()[-1])
    assert summary == {"published": 2, "bad_lines": [2], "topic": kafka_settings.topic_prompts}
    records = read_topic(kafka_settings, kafka_settings.topic_prompts, pb.common.PromptRecord, 2, timeout_s=20)
    assert sorted(r.value.prompt_id for r in records) == ["a", "c"]
    assert {r.key for r in records} == {b"a", b"c"}
