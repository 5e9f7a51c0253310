"""A stand-in kubelet for the tests (not in the product): for each pod bound to one of its
nodes it starts the real process the pod describes, the `divingbell agent` command line of the
DaemonSet, in that node's network namespace (the pod uses the host network), and reports the
pod's status from the agent's readiness probe, so the DaemonSet and disruption controllers act
on real state.

As a kubelet does: the Secret volume is written once into a directory of the pod's own (an
immutable Secret is never re-projected), the container's paths are that directory and the
node's root, the env's fieldRefs are resolved, the token is a TokenRequest bound to the pod
(handed over as a kubeconfig: the in-cluster path /var/run/secrets is the machine's own), and
a pod being deleted has its process stopped (SIGTERM) before it is removed. The apiserver
listens on the machine's 127.0.0.1; each node reaches it through a forwarder whose listening
socket lives in the node's network namespace.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.kube.controlplane import ApiError, ControlPlane, Rest, kubeconfig
from tests.kube.kubelet import pod_token, set_ready

CLONE_NEWNET = 0x40000000
FORWARDED_PORT = 6443
T = TypeVar("T")


def in_netns(name: str, action: Callable[[], T]) -> T:
    """Run `action` on a thread of its own that entered network namespace `name`: sockets it
    creates live there (a thread's network namespace is its own)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{name}") as handle:
            if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                errors.append(OSError(ctypes.get_errno(), f"setns into {name}"))
                return
        try:
            result.append(action())
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


class Forwarder:
    """ADDRESS:6443 (default 127.0.0.1) inside a network namespace, connected to the
    apiserver outside."""

    def __init__(self, netns: str, target_port: int, address: str = "127.0.0.1") -> None:
        def listen() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, FORWARDED_PORT))
            sock.listen(16)
            return sock

        self.listener = in_netns(netns, listen)
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            outside = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def probe(netns: str, port: int, path: str) -> int:
    """The status of GET http://127.0.0.1:port/path inside the namespace; 0 if unreachable."""
    def get() -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            connection.request("GET", path)
            return connection.getresponse().status
        except OSError:
            return 0
        finally:
            connection.close()

    return in_netns(netns, get)


@dataclass
class RunningPod:
    uid: str
    node: str
    process: subprocess.Popen[bytes]
    log: Path
    ready: bool = False


@dataclass
class StandInKubelet:
    plane: ControlPlane
    admin: Rest
    namespace: str  # the agents' namespace: the only pods it runs
    nodes: dict[str, str]  # node name -> its network namespace
    root: Path
    pods: dict[str, RunningPod] = field(default_factory=dict)
    forwarders: list[Forwarder] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    # Per node: the directory its pods' hostPath "/" is (default root/nodes/NODE), and a
    # command the container's process is started through (after entering the node's network
    # namespace), e.g. `unshare -m` with the mounts a test needs.
    host_roots: dict[str, Path] = field(default_factory=dict)
    launchers: dict[str, list[str]] = field(default_factory=dict)
    # Nodes whose exited containers are not restarted (yet): a node that is "rebooting".
    down: set[str] = field(default_factory=set)

    def start(self) -> None:
        for netns in self.nodes.values():
            self.forwarders.append(Forwarder(netns, int(self.plane.server.rsplit(":", 1)[1])))
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for running in self.pods.values():
            _terminate(running.process)
        for forwarder in self.forwarders:
            forwarder.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.sync()
            except Exception as error:  # a kubelet keeps going; the test sees the pod's state
                print(f"stand-in kubelet: {error!r}", file=sys.stderr)
            self.stop.wait(0.5)

    def sync(self) -> None:
        pods = self.admin.get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]
        seen = set()
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            node = spec.get("nodeName")
            if node not in self.nodes:
                # A node without a kubelet: a pod being deleted there is gone at once (its
                # DaemonSet pods are deleted when the DaemonSet's nodeSelector leaves it).
                if meta.get("deletionTimestamp") and meta.get("ownerReferences"):
                    self._remove(pod)
                continue
            seen.add(meta["uid"])
            if meta.get("deletionTimestamp"):
                self._remove(pod)
            elif meta["uid"] not in self.pods:
                self.pods[meta["uid"]] = self._run(pod, node)
            elif self.pods[meta["uid"]].process.poll() is not None and node not in self.down:
                # restartPolicy Always: the container starts again, in the same pod.
                self.pods[meta["uid"]] = self._run(pod, node)
            else:
                self._report(pod, node)
        for uid in [u for u in self.pods if u not in seen]:
            _terminate(self.pods.pop(uid).process)

    def _run(self, pod: dict[str, Any], node: str) -> RunningPod:
        meta, spec = pod["metadata"], pod["spec"]
        (container,) = spec["containers"]
        directory = self.root / "pods" / meta["uid"]
        mounts: dict[str, Path] = {}
        for volume in spec["volumes"]:
            if "secret" in volume:
                mounted = directory / "volumes" / volume["name"]
                mounted.mkdir(parents=True, exist_ok=True)
                secret = self.admin.get(f"/api/v1/namespaces/{self.namespace}/secrets/"
                                        f"{volume['secret']['secretName']}")
                for key, value in secret.get("data", {}).items():
                    (mounted / key).write_bytes(base64.b64decode(value))
                mounts[volume["name"]] = mounted
            elif "hostPath" in volume:
                mounts[volume["name"]] = self.host_roots.get(node,
                                                             self.root / "nodes" / node)
        # The projected service-account token volume is left out: the token is handed over
        # as a kubeconfig.
        paths = {m["mountPath"]: mounts[m["name"]] for m in container["volumeMounts"]
                 if m["name"] in mounts}
        args = [_mapped(arg, paths) for arg in container["args"]]
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
               "KUBECONFIG": str(kubeconfig(
                   directory / "token.kubeconfig", f"https://127.0.0.1:{FORWARDED_PORT}",
                   self.plane.ca_path, token=pod_token(
                       self.admin, self.namespace, spec["serviceAccountName"], pod)))}
        for item in container["env"]:
            env[item["name"]] = _field(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
        log = directory / "agent.log"
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.nodes[node], *self.launchers.get(node, []),
             sys.executable, "-m", "divingbell", *args, "--poll-interval", "0.5",
             "--label-interval", "0.5"],
            env=env, stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        return RunningPod(meta["uid"], node, process, log)

    def _report(self, pod: dict[str, Any], node: str) -> None:
        running = self.pods[pod["metadata"]["uid"]]
        (container,) = pod["spec"]["containers"]
        ready = running.process.poll() is None and probe(
            self.nodes[node], container["readinessProbe"]["httpGet"]["port"],
            container["readinessProbe"]["httpGet"]["path"]) == 200
        if ready != running.ready or pod.get("status", {}).get("phase") != "Running":
            set_ready(self.admin, self.namespace, pod["metadata"]["name"], ready,
                      container=container["name"])
            running.ready = ready

    def _remove(self, pod: dict[str, Any]) -> None:
        running = self.pods.pop(pod["metadata"]["uid"], None)
        if running is not None:
            _terminate(running.process)
        try:
            self.admin.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/"
                               f"{pod['metadata']['name']}",
                               {"gracePeriodSeconds": 0,
                                "preconditions": {"uid": pod["metadata"]["uid"]}})
        except ApiError as error:
            if error.code not in (404, 409):
                raise

    def power_off(self, node: str) -> None:
        """Stop `node`'s containers and keep them stopped until `power_on`."""
        self.down.add(node)
        for running in self.pods.values():
            if running.node == node:
                _terminate(running.process)

    def power_on(self, node: str) -> None:
        self.down.discard(node)

    def log(self, node: str) -> str:
        return "\n".join(f"--- {uid}\n{running.log.read_text(errors='replace')}"
                         for uid, running in self.pods.items() if running.node == node)


def _mapped(arg: str, paths: dict[str, Path]) -> str:
    for mount, local in sorted(paths.items(), key=lambda item: -len(item[0])):
        if arg == mount or arg.startswith(mount + "/"):
            return str(local) + arg[len(mount):]
    return arg


def _field(pod: dict[str, Any], path: str) -> str:
    if path.startswith("metadata.annotations['"):
        return str(pod["metadata"]["annotations"][path.split("'")[1]])
    value: Any = pod
    for part in path.split("."):
        value = value[part]
    return str(value)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(what: str, condition: Callable[[], bool], timeout: float,
              explain: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f} s\n{explain()}")
        time.sleep(0.5)
