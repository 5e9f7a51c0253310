"""Reports that arrive together are stored together (fleet/hotpath.py `Lane`,
api/machines.store_reports): one thread hand-off and one write transaction for the batch, each
report committed before its 201, and a failing report fails only itself. On both stores, over
HTTP to a real server.

The batch is made deterministic, not hoped for: a first report is sent alone and its batch held
in the worker thread until the other reports have reached the service and wait in the lane
behind it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from divingbell.fleet import hotpath
from divingbell.fleet.api.machines import store_reports
from divingbell.fleet.app import FleetApp
from tests.fleet.servers import ThreadServer
from tests.fleet.test_api import DOC, register
from tests.fleet.test_hotpath import Answer, send


def the_app(fleet: ThreadServer) -> FleetApp:
    assert fleet._server is not None
    app = fleet._server.config.app
    assert isinstance(app, FleetApp)
    return app


@contextmanager
def held_first_batch(fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch,
                     waiting: int) -> Iterator[tuple[list[int], list[int]]]:
    """The first report batch waits in its worker thread until `waiting` more reports wait in
    the lane; yields (the batch sizes, the write transactions committed) as they happen."""
    app = the_app(fleet)
    assert app.hot_paths is not None
    lane = app.hot_paths.reports
    # One batch at a time (SQLite's; PostgreSQL's lanes run several): the rest must wait.
    monkeypatch.setattr(lane, "parallel", 1)
    # The lanes' batches, which PostgreSQL's reports take only when the event loop's own
    # connections (fleet/pgloop.py) cannot answer them: switched off here.
    monkeypatch.setattr(app.hot_paths, "loop_connections", 0)
    sizes: list[int] = []
    commits: list[int] = []
    holding.clear()

    def batched(*args: Any, **kwargs: Any) -> Any:
        if not sizes:
            holding.set()
            deadline = time.monotonic() + 30
            while len(lane.pending) < waiting and time.monotonic() < deadline:
                time.sleep(0.005)
        sizes.append(len(args[1]))
        return store_reports(*args, **kwargs)

    def committed(_connection: Any) -> None:
        commits.append(1)

    monkeypatch.setattr(hotpath, "store_reports", batched)
    engine = app.state.db.write_engine
    event.listen(engine, "commit", committed)
    try:
        yield sizes, commits
    finally:
        event.remove(engine, "commit", committed)


holding = threading.Event()
"""Set while the first batch is held."""


def report_of(etag: str, **changes: Any) -> bytes:
    return json.dumps({"revision": 1, "etag": etag, "state": "converged",
                       "modules": {"sysctl": {"changes": 1, "failures": []}},
                       **changes}).encode()


def concurrently(fleet: ThreadServer, reports: list[tuple[str, str, bytes]]) -> list[Answer]:
    """POST each (machine, token, body) at once, each from its own thread."""
    def one(report: tuple[str, str, bytes]) -> Answer:
        machine, token, body = report
        return send(fleet, "POST", f"/v1/machines/{machine}/reports", token, body)

    with ThreadPoolExecutor(len(reports)) as pool:
        return list(pool.map(one, reports))


def first_alone_then_together(fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch,
                              first: tuple[str, str, bytes],
                              together: list[tuple[str, str, bytes]]
                              ) -> tuple[list[Answer], list[int], list[int]]:
    """`first` reported alone and held in the worker thread while `together` arrive and wait
    behind it; the answers (in the order given), the batch sizes and the commits."""
    with held_first_batch(fleet, monkeypatch, waiting=len(together)) as (sizes, commits), \
            ThreadPoolExecutor(1) as pool:
        held = pool.submit(concurrently, fleet, [first])
        assert holding.wait(30)
        answers = concurrently(fleet, together)
        answers.insert(0, held.result()[0])
    return answers, sizes, commits


def machines(fleet: ThreadServer, count: int) -> list[tuple[str, str, str]]:
    """`count` registered workers: (id, token, the ETag of its configuration), in id order."""
    fleet.admin.push_document(DOC.encode())
    register(fleet, 1)  # the control plane
    found = []
    for n in range(2, 2 + count):
        machine, client = register(fleet, n)
        etag = client.config(machine).etag
        assert etag is not None
        found.append((machine, str(client.token), etag))
    return sorted(found)


def test_concurrent_reports_share_one_transaction(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet_machines = machines(fleet, 6)
    first, rest = fleet_machines[0], fleet_machines[1:]
    answers, sizes, commits = first_alone_then_together(
        fleet, monkeypatch, (first[0], first[1], report_of(first[2])),
        [(m[0], m[1], report_of(m[2])) for m in rest])
    assert [status for status, _, _ in answers] == [201] * 6
    assert all(body == {"state": "ready", "up_to_date": True, "revision": 1}
               for _, _, body in answers)
    assert sizes == [1, 5]
    assert len(commits) == 2  # five reports, one transaction
    for machine, _, _ in fleet_machines:
        assert len(fleet.admin.call("GET", f"/v1/machines/{machine}/reports")) == 1


@pytest.mark.parametrize("failing", ["unknown-revision", "wrong-secret"])
def test_a_failing_report_fails_only_itself(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """The failing report sorts last in its batch: an unknown revision fails after the good
    ones before it were written in the batch's transaction, a wrong secret before anything
    was written (the credentials are all checked first)."""
    fleet_machines = machines(fleet, 6)
    requests = [(machine, token, report_of(etag)) for machine, token, etag in fleet_machines]
    machine, token, etag = fleet_machines[5]
    if failing == "unknown-revision":
        requests[5] = (machine, token, report_of(etag, revision=99))
    else:
        requests[5] = (machine, token[:-1] + ("A" if token[-1] != "A" else "B"),
                       report_of(etag))
    answers, sizes, _commits = first_alone_then_together(fleet, monkeypatch, requests[0],
                                                         requests[1:])
    assert sizes == [1, 5]
    assert [status for status, _, _ in answers] == [201] * 5 + [
        422 if failing == "unknown-revision" else 401]
    if failing == "unknown-revision":
        assert answers[5][2]["detail"]["error"] == "unknown-revision"
    # Each good report stored once (the failed batch was rolled back, then each one stored
    # on its own), the failing one not at all.
    for n, (machine, _, _) in enumerate(fleet_machines):
        stored = fleet.admin.call("GET", f"/v1/machines/{machine}/reports")
        assert len(stored) == (1 if n < 5 else 0), machine
        if n < 5:
            assert fleet.admin.machine(machine)["state"] == "ready"


def test_a_lane_answers_every_waiting_request_when_its_batch_cannot_run() -> None:
    """A hand-off that fails (the pool shut down, the service stopping) fails every request
    waiting in that batch and behind it; none waits forever, and the lane keeps working."""
    import asyncio

    failing = threading.Event()

    class Threads(hotpath.StoreThreads):
        def run(self, work: Callable[[], None]) -> None:
            if failing.is_set():
                raise RuntimeError("cannot hand off")
            super().run(work)

    threads = Threads(2)

    async def scenario() -> tuple[list[Any], list[Any]]:
        lane: hotpath.Lane[int, int] = hotpath.Lane(lambda jobs: [j * 2 for j in jobs],
                                                     threads, parallel=2)
        failing.set()
        failed = await asyncio.gather(*(lane.enqueue(n) for n in range(5)),
                                      return_exceptions=True)
        failing.clear()
        worked = await asyncio.gather(*(lane.enqueue(n) for n in range(5)))
        return failed, worked

    try:
        failed, worked = asyncio.run(scenario())
    finally:
        threads.stop()
    assert all(isinstance(result, RuntimeError) for result in failed)
    assert worked == [0, 2, 4, 6, 8]


def test_a_batch_that_raises_fails_its_requests_and_the_lane_goes_on() -> None:
    """A batch whose store function itself raises (not one error per request): each of its
    requests gets that error, and the next batch runs."""
    import asyncio

    def run(jobs: list[int]) -> list[int | Exception]:
        if -1 in jobs:
            raise ValueError("the store went away")
        return [job + 1 for job in jobs]

    threads = hotpath.StoreThreads(2)

    async def scenario() -> tuple[list[Any], list[int]]:
        lane: hotpath.Lane[int, int] = hotpath.Lane(run, threads)
        failed = list(await asyncio.gather(lane.enqueue(-1), return_exceptions=True))
        worked = await asyncio.gather(*(lane.enqueue(n) for n in range(3)))
        return failed, worked

    try:
        failed, worked = asyncio.run(scenario())
    finally:
        threads.stop()
    assert [type(result) for result in failed] == [ValueError]
    assert worked == [1, 2, 3]


def test_one_machine_twice_in_a_batch_is_stored_in_order(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine's two reports in one batch (a retry racing the original): each read what
    the one before it wrote, as one after the other would."""
    (first, first_token, first_etag), (twice, token, etag) = machines(fleet, 2)
    answers, sizes, _commits = first_alone_then_together(
        fleet, monkeypatch, (first, first_token, report_of(first_etag)),
        [(twice, token, report_of(etag, state="failed"))] * 2)
    assert [status for status, _, _ in answers] == [201] * 3
    assert sizes == [1, 2]
    assert len(fleet.admin.call("GET", f"/v1/machines/{twice}/reports")) == 2
    # One transition to degraded, not one per report: the second saw the first's.
    history = [h["to"] for h in fleet.admin.machine(twice)["history"]]
    assert history.count("degraded") == 1


def test_a_request_right_after_a_batch_is_taken() -> None:
    """A request submitted as soon as its previous one was answered (the drain that answered
    it finishing in the same loop turn) starts a drain of its own; it never waits with none
    running. (The 5 s bound only stops a hang from hanging the suite.)"""
    import asyncio

    threads = hotpath.StoreThreads(2)

    async def one_after_another() -> list[int]:
        lane: hotpath.Lane[int, int] = hotpath.Lane(lambda jobs: [j + 1 for j in jobs],
                                                     threads)
        return [await lane.enqueue(n) for n in range(20)]

    async def bounded() -> list[int]:
        return await asyncio.wait_for(one_after_another(), timeout=5)

    try:
        assert asyncio.run(bounded()) == list(range(1, 21))
    finally:
        threads.stop()


class _Forgets(set[Any]):
    """A revision cache that remembers nothing: every report reads its revision."""

    def __contains__(self, _item: object) -> bool:
        return False


def test_a_batch_reading_its_revision_is_one_transaction(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statement a batch runs answers in PostgreSQL's pipeline mode: a revision read in
    the batch (not yet remembered by the process) does not fail the batch into one
    transaction per report."""
    from divingbell.fleet import views

    monkeypatch.setattr(views, "_known_revisions", _Forgets())
    (first, first_token, first_etag), *others = machines(fleet, 3)
    answers, sizes, commits = first_alone_then_together(
        fleet, monkeypatch, (first, first_token, report_of(first_etag)),
        [(machine, token, report_of(etag)) for machine, token, etag in others])
    assert [status for status, _, _ in answers] == [201] * 3
    assert sizes == [1, 2]
    assert len(commits) == 2  # one per batch: the batch of two did not fall back


def test_reports_settling_rollout_turns_in_one_batch_advance_the_rollout(
        fleet: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two machines of a rollout's wave report the new revision together: their batch is one
    transaction (the rollout's steps run after the pipeline, in the same transaction), and
    the wave it completes lets the next one be served the new revision."""
    from tests.fleet.test_rollouts_api import DOC as ROLLOUT_DOC
    from tests.fleet.test_rollouts_api import converge, current, fleet_of, served

    clients = fleet_of(fleet, 5)  # a control plane of one, four workers
    fleet.admin.call("PUT", "/v1/rollout-policy", {"max_unavailable": 2})
    second = fleet.admin.push_document(ROLLOUT_DOC.format(value=20).encode())["revision"]
    waves = [[m["id"] for m in wave] for wave in current(fleet)["waves"]]
    assert [len(wave) for wave in waves] == [1, 2, 2]
    converge(clients[waves[0][0]], waves[0][0])
    wave, last = waves[1], waves[2]

    def report(machine: str) -> tuple[str, str, bytes]:
        config = clients[machine].config(machine)
        assert config.etag is not None and config.revision is not None
        return (machine, str(clients[machine].token),
                report_of(config.etag, revision=config.revision))

    assert all(served(clients[machine], machine) == second - 1 for machine in last)
    answers, sizes, commits = first_alone_then_together(
        fleet, monkeypatch, report(last[0]), [report(machine) for machine in wave])
    assert [status for status, _, _ in answers] == [201] * 3
    assert sizes == [1, 2]
    assert len(commits) == 2
    assert {fleet.admin.machine(machine)["state"] for machine in wave} == {"ready"}
    assert all(served(clients[machine], machine) == second for machine in last)
