"""A real Prometheus server for tests: generated config, temporary storage, 127.0.0.1 only, stopped by PID.

with PrometheusServer(binary, workdir, jobs={"serving": ["127.0.0.1:9103"]}, rule_files=[rules]) as prom:
    prom.wait_for("up", lambda r: r and r[0]["value"][1] == "1")
    prom.query('histogram_quantile(0.5, ...)')
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from services.common.process import free_port

Result = list[dict[str, Any]]


class PrometheusServer:
    """One Prometheus process scraping `jobs` (job name → targets) every `interval`, evaluating `rule_files`."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        jobs: dict[str, list[str]],
        rule_files: list[Path] | None = None,
        interval: str = "1s",
        labels: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.jobs = jobs
        self.rule_files = rule_files or []
        self.interval = interval
        self.labels = labels or {}
        """Labels every target gets (as Kubernetes service discovery adds `namespace`)."""
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets, "labels": self.labels}]}
                for job, targets in self.jobs.items()
            ],
        }

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        self.port = free_port()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process this object started, then SIGKILL if it does not exit in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> Result:
        """Instant query; the list of {metric, value: [time, "string value"]} results."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def wait_for(self, what: Callable[[], Any], ready: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        """Polls `what()` until `ready(result)`; returns the result (or fails with the last one seen)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = what()
            if ready(last):
                return last
            time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout} s; last result: {last}")
