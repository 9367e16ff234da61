"""Training prompts published just ahead of the teacher, not all at once.

The prompts topic is a queue: an on-policy score request the trainer sends lands behind every prompt published
before it, so 6,000 prompts published up front would make each request wait until the teacher had answered them
all (and its completion stale by hundreds of steps). The feeder keeps the teacher's backlog — the prompts-topic lag
it exports, which counts every producer's records — under `backlog` records, tops it up as the teacher works
through it, and stops publishing when the run ends: the teacher never answers prompts nobody will train on.

The first `hold_at` records (a few training prompts, then the held-out ones) are published first and the rest only
once `released()` says the teacher has answered them: its engine interleaves every request it has, and a backlog of
teacher-forced scoring requests (prefills with top-k at every position) slowed the held-out generations so much on
2 cores that after 600 s 39 of 400 were still unanswered and the run was never evaluated.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from services.common import pb
from services.common.kafka import ProtoProducer
from services.common.settings import KafkaSettings
from services.teacher.prompts import stamp

logger = logging.getLogger(__name__)


class Feeder:
    def __init__(
        self,
        kafka: KafkaSettings,
        records: Sequence[pb.common.PromptRecord],
        backlog: Callable[[], float | None],
        max_backlog: int,
        poll_s: float = 0.5,
        hold_at: int = 0,
        released: Callable[[], bool] | None = None,
    ) -> None:
        self.kafka = kafka
        self.records = list(records)
        self.backlog = backlog
        self.max_backlog = max_backlog
        self.poll_s = poll_s
        self.hold_at = hold_at if released is not None else 0
        self.released = released or (lambda: True)
        self._held = bool(self.hold_at)
        self.published = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prompt-feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def done(self) -> bool:
        return self.published >= len(self.records)

    def _run(self) -> None:
        producer = ProtoProducer(self.kafka, "prompt-feeder")
        try:
            while not self._stop.is_set() and not self.done:
                if self._held and self.published >= self.hold_at:
                    if not self.released():
                        self._stop.wait(self.poll_s)
                        continue
                    self._held = False
                waiting = self.backlog()
                # Unknown lag (the teacher has not polled yet): publish one backlog's worth and look again.
                room = self.max_backlog - int(waiting) if waiting is not None else self.max_backlog - self.published
                if room >= self.max_backlog // 2 or (waiting is not None and waiting == 0):
                    end = self.published + max(room, 1)
                    if self._held:
                        end = min(end, self.hold_at)
                    chunk = self.records[self.published : end]
                    for record in chunk:
                        producer.send(self.kafka.topic_prompts, record.prompt_id, stamp(record))
                    producer.flush()
                    self.published += len(chunk)
                self._stop.wait(self.poll_s)
        except BaseException as exc:  # surfaced by the pipeline, never swallowed
            self.error = exc
            logger.exception("prompt feeder failed")
        finally:
            producer.close()
