"""Kafka reachability for a Kafka-bound service: recreates missing topics and flips gRPC health while Kafka is gone.

The trainer and the teacher cannot do their work without the broker, so their health (the "" service and their own)
says NOT_SERVING once Kafka has been unreachable for `unavailable_s`, and SERVING again at the first successful check;
Kubernetes readiness probes then follow the broker. Serving is not watched: it keeps streaming the model it holds
while Kafka is away (only promotions wait), so its health says only whether it can serve. Each check lists the
topics and creates the missing ones, so a broker that came back empty (an in-memory broker after a restart) gets its
topics back from whichever service notices first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from services.common.kafka import ensure_topics
from services.common.settings import KafkaSettings

logger = logging.getLogger(__name__)

SetServing = Callable[[bool], Awaitable[None]]


class KafkaHealth:
    """Checks Kafka every `interval_s` on a worker thread (at most one check in flight: a check that hangs on a
    dead broker does not delay the verdict, which comes from the time of the last success)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        set_serving: SetServing,
        unavailable_s: float,
        interval_s: float,
        topics: list[str] | None = None,
    ) -> None:
        self.kafka = kafka
        self.set_serving = set_serving
        self.unavailable_s = unavailable_s
        self.interval_s = interval_s
        self.topics = topics
        self.reachable = True
        self.last_ok = time.monotonic()
        self.recreated: list[str] = []
        self._check: asyncio.Future[list[str]] | None = None

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            await self.tick()
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        """Starts a check when none is running, takes the result of a finished one, and updates health."""
        if self._check is None:
            self._check = asyncio.ensure_future(asyncio.to_thread(ensure_topics, self.kafka, self.topics))
        await asyncio.wait([self._check], timeout=min(self.interval_s, 1.0))
        if self._check.done():
            check, self._check = self._check, None
            try:
                created = check.result()
            except Exception as exc:
                logger.debug("kafka check failed: %r", exc)
            else:
                self.last_ok = time.monotonic()
                if created:
                    self.recreated += created
                    logger.warning("recreated missing topics", extra={"topics": created})
        down_s = time.monotonic() - self.last_ok
        if self.reachable and down_s > self.unavailable_s:
            self.reachable = False
            logger.error("kafka unreachable: NOT_SERVING", extra={"seconds": round(down_s, 1)})
            await self.set_serving(False)
        elif not self.reachable and down_s <= self.unavailable_s:
            self.reachable = True
            logger.info("kafka reachable again: SERVING")
            await self.set_serving(True)
