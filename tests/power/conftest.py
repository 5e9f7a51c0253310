"""BMC emulators as real processes on loopback, the fault proxies in front of them, and a
fleet service whose power settings suit a test (short intervals and timeouts)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from divingbell.fleet.settings import FleetSettings
from tests.fleet.conftest import postgres  # noqa: F401  (the session's PostgreSQL, shared)
from tests.fleet.servers import ThreadServer, free_port, thread_server, wait_for
from tests.power.faults import HttpFaultProxy, UdpFaultRelay
from tests.power.qemu_power import VmSpec

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "bmcadmin", "S3cret-bmc-pass-7f1e"
"""Distinctive enough to grep every output, log and export for."""


@dataclass
class Emulator:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    state_file: Path | None = None
    qmp: Path | None = None
    """The QMP socket of the emulator's VM (QemuDriver), to hang it (`stop`) as a test."""
    console: Path | None = None
    """The serial console of the emulator's VM (IPMI; the Redfish fixtures keep it in
    `state_file`)."""

    def state(self) -> dict[str, Any]:
        assert self.state_file is not None
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def _htpasswd(path: Path) -> Path:
    path.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    return path


@contextmanager
def redfish_emulator(tmp_path: Path, name: str, *extra: str, console: Path | None = None,
                     qmp: Path | None = None) -> Iterator[Emulator]:
    """sushy-tools' emulator (tests/power/redfish_bmc.py) as a process on loopback, up (its
    port accepts connections), stopped when done; `extra` are redfish_bmc.py's own options."""
    auth = _htpasswd(tmp_path / f"{name}.htpasswd")
    port = free_port()
    log = tmp_path / f"{name}.log"
    emulator = Emulator(_start(["tests.power.redfish_bmc", str(port), str(auth),
                                str(tmp_path / f"{name}-state"), *extra], log),
                        port, log, console, qmp)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert emulator.process.poll() is None, log.read_text()
            return False

    wait_for(up, timeout=30)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def redfish(tmp_path: Path) -> Iterator[Emulator]:
    with redfish_emulator(tmp_path, "redfish") as emulator:
        yield emulator


def require_qemu() -> None:
    from tests.boot.qemu import missing_tools

    if reason := missing_tools():
        pytest.skip(reason)


@pytest.fixture
def redfish_qemu(tmp_path: Path) -> Iterator[Emulator]:
    """The Redfish emulator whose system is a real qemu VM (QemuDriver in redfish_bmc.py),
    without a disk or a service to boot from: iPXE is all it runs."""
    import tempfile

    require_qemu()
    workdir = tmp_path / "vm"
    workdir.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="qmp-"))
    spec = VmSpec(str(workdir), qmp=str(sockets / "vm.qmp"))
    try:
        with redfish_emulator(tmp_path, "redfish-qemu", "--qemu",
                              str(spec.write(tmp_path / "vm.json")), console=spec.console(),
                              qmp=sockets / "vm.qmp") as emulator:
            yield emulator
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


@dataclass
class TlsRedfish:
    emulator: Emulator
    url: str
    ca_pem: str


@pytest.fixture
def redfish_tls(tmp_path: Path) -> Iterator[TlsRedfish]:
    """The Redfish emulator serving HTTPS with a certificate from a scratch CA."""
    from tests.policy.pki import ScratchCa

    ca = ScratchCa.create("BMC test CA")
    cert, key = ca.server_cert(tmp_path, "bmc")
    with redfish_emulator(tmp_path, "redfish-tls", str(cert), str(key)) as emulator:
        yield TlsRedfish(emulator, f"https://127.0.0.1:{emulator.port}", ca.pem.decode())


@contextmanager
def ipmi_emulator(tmp_path: Path, name: str, *extra: str, console: Path | None = None
                  ) -> Iterator[Emulator]:
    """pyghmi's BMC (tests/power/ipmi_bmc.py) as a process on loopback, up (its state file
    written), stopped when done; `extra` are ipmi_bmc.py's own options."""
    port = free_port()
    state = tmp_path / f"{name}-state.json"
    log = tmp_path / f"{name}.log"
    emulator = Emulator(_start(["tests.power.ipmi_bmc", str(port), USER, PASSWORD, str(state),
                                *extra], log), port, log, state, console=console)
    wait_for(lambda: state.exists() or emulator.process.poll() is not None, timeout=30)
    assert emulator.process.poll() is None, log.read_text()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def ipmi(tmp_path: Path) -> Iterator[Emulator]:
    with ipmi_emulator(tmp_path, "ipmi") as emulator:
        yield emulator


@pytest.fixture
def ipmi_qemu(tmp_path: Path) -> Iterator[Emulator]:
    """The IPMI BMC whose machine is a real qemu VM (QemuMachine in ipmi_bmc.py), without a
    disk or a service to boot from: iPXE is all it runs."""
    require_qemu()
    workdir = tmp_path / "vm"
    workdir.mkdir()
    spec = VmSpec(str(workdir))
    with ipmi_emulator(tmp_path, "ipmi-qemu", "--qemu", str(spec.write(tmp_path / "vm.json")),
                       console=spec.console()) as emulator:
        yield emulator


@pytest.fixture
def http_proxy(redfish: Emulator) -> Iterator[HttpFaultProxy]:
    proxy = HttpFaultProxy(redfish.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def udp_relay(ipmi: Emulator) -> Iterator[UdpFaultRelay]:
    relay = UdpFaultRelay(ipmi.port)
    try:
        yield relay
    finally:
        relay.close()


def power_settings(db_url: str, **extra: Any) -> FleetSettings:
    values: dict[str, Any] = {"db_url": db_url, "control_plane_size": 1,
                              "power_min_interval_seconds": 0.05, "power_timeout_seconds": 6.0,
                              "bmc_request_timeout_seconds": 2.0, **extra}
    return FleetSettings(**values)


@pytest.fixture
def power_fleet(tmp_path: Path) -> Iterator[ThreadServer]:
    """A fleet on SQLite whose secrets key is generated beside the store."""
    with thread_server(power_settings(f"sqlite:///{tmp_path / 'store' / 'fleet.db'}")) as fleet:
        yield fleet


@pytest.fixture
def postgres_url_or_skip(request: pytest.FixtureRequest) -> str:
    from tests.fleet.servers import PostgresCluster

    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()
