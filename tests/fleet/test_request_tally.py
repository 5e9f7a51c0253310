"""The request families the service counts itself (`app.RequestTally`) read exactly as
prometheus_client's own Counter and Histogram would for the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from divingbell.fleet.app import LATENCY_BUCKETS, RequestTally

REQUESTS = [("GET", "/v1/machines/{machine_id}/config", 304, 0.0004),
            ("GET", "/v1/machines/{machine_id}/config", 304, 0.002),  # on a bound: le
            ("POST", "/v1/machines/{machine_id}/reports", 201, 0.03),
            ("POST", "/v1/machines/{machine_id}/reports", 503, 7.5),  # past the last bound
            ("GET", "unmatched", 404, 0.0)]


def exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if "_created" not in line)


def test_the_tally_reads_as_prometheus_clients_counter_and_histogram() -> None:
    ours = CollectorRegistry()
    tally = RequestTally()
    ours.register(tally)
    theirs = CollectorRegistry()
    counter = Counter("divingbell_fleet_requests_total", "HTTP requests served",
                      ["method", "route", "status"], registry=theirs)
    histogram = Histogram("divingbell_fleet_request_duration_seconds",
                          "Time to answer a request", ["route"], registry=theirs,
                          buckets=LATENCY_BUCKETS)
    for method, route, status, seconds in REQUESTS * 3:
        tally.add(method, route, status, seconds)
        counter.labels(method, route, str(status)).inc()
        histogram.labels(route).observe(seconds)
    assert exposition(ours) == exposition(theirs)
    assert ('divingbell_fleet_request_duration_seconds_bucket{le="0.002",'
            'route="/v1/machines/{machine_id}/config"} 6.0') in exposition(ours)
