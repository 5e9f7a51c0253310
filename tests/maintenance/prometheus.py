"""A real Prometheus server for tests: Debian's `prometheus` binary on a loopback port, a
temporary storage directory, and a rules file with one alert that always fires and one that
never does."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

RULES = """\
groups:
  - name: divingbell-test
    interval: 1s
    rules:
      - alert: NodeAlwaysFiring
        expr: vector(1)
        labels: {severity: critical}
      - alert: NodeNeverFiring
        expr: vector(1) > 2
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def prometheus_server(workdir: Path, timeout: float = 60.0) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs Debian's prometheus package (installed by .ci/run)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yml").write_text(RULES)
    (workdir / "prometheus.yml").write_text(
        "global: {evaluation_interval: 1s, scrape_interval: 60s}\n"
        f"rule_files: [{workdir / 'rules.yml'}]\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not firing(url):
            if process.poll() is not None:
                raise RuntimeError("prometheus exited: "
                                   + (workdir / "prometheus.log").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no firing alert from {url} in {timeout}s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def firing(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=2) as response:
            alerts = json.loads(response.read())["data"]["alerts"]
    except OSError:
        return False
    return any(a["state"] == "firing" for a in alerts)
