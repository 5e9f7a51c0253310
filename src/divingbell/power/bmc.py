"""The BMC edge: one adapter per protocol over a library made for it (sushy for Redfish,
pyghmi for IPMI), behind one small interface. No protocol code of our own.

Every failure becomes `BmcError` with a message that names the BMC and what failed, never its
credentials. An adapter does one request per call; deciding what to do with the answers is
`control.py`'s job.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from divingbell.core.document.types import is_ip_address
from divingbell.power.secrets import Credentials

PROTOCOLS: Final = ("redfish", "ipmi")
BOOT_DEVICES: Final = ("pxe", "disk")
ON, OFF, TRANSITIONING = "on", "off", "transitioning"
Action = Literal["on", "off", "soft-off"]
IPMI_PORT = 623


class BmcError(Exception):
    """A query or command the BMC did not answer, refused, or answered with nonsense."""


@dataclass(frozen=True)
class Endpoint:
    """Where a BMC is and how to trust it (no credentials)."""

    protocol: str
    address: str
    """Redfish: the system's URL (https://bmc/redfish/v1/Systems/1) or the BMC's root when it
    has one system; IPMI: HOST or HOST:PORT ([v6]:PORT)."""
    verify_tls: bool = True
    ca_pem: str | None = None
    timeout: float = 10.0


def check_address(protocol: str, address: str) -> str:
    """The address normalised, or ValueError naming what is wrong with it."""
    if protocol == "redfish":
        parts = urllib.parse.urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("redfish: not an http(s):// URL of the BMC")
        if parts.username or parts.password:
            raise ValueError("redfish: credentials do not go in the URL (use the username and "
                             "password)")
        if parts.query or parts.fragment:
            raise ValueError("redfish: a URL without query or fragment")
        path = parts.path.rstrip("/")
        if path and not path.startswith("/redfish/v1/Systems/"):
            raise ValueError("redfish: give the BMC's root (https://bmc) or a system's URL "
                             "(https://bmc/redfish/v1/Systems/ID)")
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    if protocol == "ipmi":
        host, port = split_host_port(address)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise ValueError(f"protocol: one of {', '.join(PROTOCOLS)}")


def split_host_port(address: str) -> tuple[str, int]:
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"ipmi: {address!r} is not HOST[:PORT]")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host or any(c in host for c in "/@ ") or (":" in host and not is_ip_address(host)):
        raise ValueError(f"ipmi: {address!r} is not HOST[:PORT]")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"ipmi: port {port_text!r} is not a port number")
    return host, int(port_text) if port_text else IPMI_PORT


class Bmc(Protocol):
    def power_state(self) -> str:
        """`on`, `off` or `transitioning`, as the BMC says now; BmcError if it does not."""

    def power(self, action: Action) -> None: ...

    def boot_once(self, device: str) -> None:
        """Boot from `pxe` or `disk` at the next boot only."""

    def close(self) -> None: ...


def connect(endpoint: Endpoint, credentials: Credentials) -> Bmc:
    if endpoint.protocol == "redfish":
        return RedfishBmc(endpoint, credentials)
    if endpoint.protocol == "ipmi":
        return IpmiBmc(endpoint, credentials)
    raise BmcError(f"unknown BMC protocol {endpoint.protocol!r}")


class RedfishBmc:
    """Redfish through sushy: basic authentication on every request (no session to lose),
    TLS verified unless the endpoint says `insecure`, at most one retry of a transient
    failure inside sushy (retrying is `control.py`'s decision, and it makes few)."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials) -> None:
        import sushy
        from sushy import auth

        self._endpoint = endpoint
        parts = urllib.parse.urlsplit(endpoint.address)
        self._root = f"{parts.scheme}://{parts.netloc}"
        self._system_path = parts.path or None
        self._ca_path: str | None = None
        verify: bool | str = endpoint.verify_tls
        if endpoint.verify_tls and endpoint.ca_pem:
            fd, self._ca_path = tempfile.mkstemp(prefix="divingbell-bmc-ca-", suffix=".pem")
            with os.fdopen(fd, "w") as handle:
                handle.write(endpoint.ca_pem)
            verify = self._ca_path
        try:
            self._conn = sushy.Sushy(
                self._root, auth=auth.BasicAuth(credentials.username, credentials.password),
                verify=verify, server_side_retries=1, server_side_retries_delay=1,
                read_timeout=int(max(1, endpoint.timeout)), connect_timeout=endpoint.timeout)
        except Exception as exc:
            self.close()
            raise self._error("connecting", exc) from None
        self._system: Any = None

    def _error(self, doing: str, exc: BaseException) -> BmcError:
        message = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
        return BmcError(f"redfish {self._root}: {doing}: {message[:400]}")

    def _get_system(self) -> Any:
        if self._system is None:
            if self._system_path:
                self._system = self._conn.get_system(self._system_path)
            else:
                members = self._conn.get_system_collection().get_members()
                if len(members) != 1:
                    raise BmcError(f"redfish {self._root}: {len(members)} systems: give the "
                                   "system's URL (https://bmc/redfish/v1/Systems/ID)")
                self._system = members[0]
        return self._system

    def power_state(self) -> str:
        import sushy

        try:
            system = self._get_system()
            system.refresh(force=True)
            state = system.power_state
        except BmcError:
            raise
        except Exception as exc:
            raise self._error("reading the power state", exc) from None
        if state == sushy.PowerState.ON:
            return ON
        if state == sushy.PowerState.OFF:
            return OFF
        if state in (sushy.PowerState.POWERING_ON, sushy.PowerState.POWERING_OFF):
            return TRANSITIONING
        raise BmcError(f"redfish {self._root}: power state {state!r} is neither on nor off")

    def power(self, action: Action) -> None:
        import sushy

        reset = {"on": sushy.ResetType.ON, "off": sushy.ResetType.FORCE_OFF,
                 "soft-off": sushy.ResetType.GRACEFUL_SHUTDOWN}[action]
        try:
            self._get_system().reset_system(reset)
        except BmcError:
            raise
        except Exception as exc:
            raise self._error(f"power {action}", exc) from None

    def boot_once(self, device: str) -> None:
        import sushy

        target = {"pxe": sushy.BootSource.PXE, "disk": sushy.BootSource.HDD}[device]
        try:
            self._get_system().set_system_boot_options(
                target=target, enabled=sushy.BootSourceOverrideEnabled.ONCE)
        except BmcError:
            raise
        except Exception as exc:
            raise self._error(f"setting the next boot to {device}", exc) from None

    def close(self) -> None:
        connector = getattr(getattr(self, "_conn", None), "_conn", None)
        if connector is not None:  # sushy's Connector: its HTTP session's sockets
            connector.close()
        if self._ca_path:
            os.unlink(self._ca_path)
            self._ca_path = None


class IpmiBmc:
    """IPMI 2.0 (RMCP+) through pyghmi. IPMI has no TLS: `verify_tls` and the CA do not apply
    (say so to operators: the BMC network must be trusted)."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials) -> None:
        self._host, self._port = split_host_port(endpoint.address)
        self._name = f"ipmi {endpoint.address}"
        from pyghmi.ipmi import command

        try:
            # As bytes: pyghmi compares and keys its session cache on the encoded values, so
            # with str a second command to one BMC waits forever on a half-registered session.
            self._command = command.Command(bmc=self._host,
                                            userid=credentials.username.encode(),
                                            password=credentials.password.encode(),
                                            port=self._port, keepalive=False)
        except Exception as exc:
            raise self._error("logging in", exc) from None

    def _error(self, doing: str, exc: BaseException) -> BmcError:
        # pyghmi raises IpmiException(None) when the BMC does not answer in time.
        text = str(exc.args[0]).strip() if exc.args and exc.args[0] else ""
        message = text or "no answer (timed out)"
        return BmcError(f"{self._name}: {doing}: {message[:400]}")

    def power_state(self) -> str:
        try:
            answer = self._command.get_power()
        except Exception as exc:
            raise self._error("reading the power state", exc) from None
        state = answer.get("powerstate") if isinstance(answer, dict) else None
        if state in (ON, OFF):
            return str(state)
        raise BmcError(f"{self._name}: power state {state!r} is neither on nor off")

    def power(self, action: Action) -> None:
        wanted = {"on": "on", "off": "off", "soft-off": "shutdown"}[action]
        try:
            self._command.set_power(wanted, wait=False)
        except Exception as exc:
            raise self._error(f"power {action}", exc) from None

    def boot_once(self, device: str) -> None:
        try:
            self._command.set_bootdev({"pxe": "network", "disk": "hd"}[device], persist=False)
        except Exception as exc:
            raise self._error(f"setting the next boot to {device}", exc) from None

    def close(self) -> None:
        """Nothing: pyghmi keeps one session per BMC and user for the process and reuses it
        (fewer logins for the BMC); logging it out here breaks pyghmi's next use of it."""
