"""The `conf.maintenance` section: validated with every problem at its path, durations and time
zones understood, and overridden per label or host like the modules."""

from __future__ import annotations

from textwrap import dedent

import pytest

from divingbell.core.document.api import node_config
from divingbell.core.document.loader import load_text
from divingbell.core.document.schema import MaintenanceConf, parse_duration
from divingbell.core.document.validate import validate
from divingbell.core.errors import DocumentError

ISSUE_EXAMPLE = dedent("""\
    conf:
      maintenance:
        reboot:
          strategy: reboot
          when: [reboot-required]
          concurrency: 1
          group_by: divingbell.io/rack
          window: {days: [mon, tue, wed, thu], start: "02:00", end: "05:00",
                   timezone: Europe/Paris}
          blockers:
            pods: {selector: "app=etcd-backup"}
            alerts: {prometheus: "http://prometheus:9090", match: "^(Node|Etcd).*"}
          drain:
            timeout: 15m
            grace_period: 60s
            on_timeout: abort
            pod_selector: ""
          health: {timeout: 20m}
      overrides:
        divingbell_maintenance:
          labels:
            - label: {key: node-role, values: [control-plane]}
              conf:
                maintenance:
                  reboot: {strategy: kexec, drain: {on_timeout: force}}
          hosts:
            - name: db1
              conf:
                maintenance:
                  reboot: {strategy: none}
""")


def problems(text: str) -> list[str]:
    with pytest.raises(DocumentError) as err:
        validate(load_text(text, "doc.yaml"))
    return [str(p) for p in err.value.problems]


def maintenance(node: str, labels: dict[str, str]) -> MaintenanceConf:
    config = node_config(validate(load_text(ISSUE_EXAMPLE, "doc.yaml")), node, labels)
    conf = config.modules["maintenance"]
    assert isinstance(conf, MaintenanceConf)
    return conf


def test_the_issue_example_loads_with_durations_in_seconds() -> None:
    reboot = maintenance("w1", {}).reboot
    assert (reboot.drain.timeout, reboot.drain.grace_period, reboot.health.timeout) == (
        900, 60, 1200)
    assert reboot.window is not None and reboot.window.timezone == "Europe/Paris"
    assert reboot.blockers.alerts is not None
    assert reboot.blockers.alerts.prometheus == "http://prometheus:9090"


def test_overrides_follow_the_module_rules() -> None:
    control = maintenance("cp1", {"node-role": "control-plane"}).reboot
    assert (control.strategy, control.drain.on_timeout, control.drain.timeout) == (
        "kexec", "force", 900)  # merged over the base: the timeout stays
    assert maintenance("db1", {"node-role": "control-plane"}).reboot.strategy == "none"
    assert maintenance("w1", {"node-role": "worker"}).reboot.strategy == "reboot"


def test_engine_modules_are_unaffected() -> None:
    config = node_config(validate(load_text(ISSUE_EXAMPLE, "doc.yaml")), "w1", {})
    assert config.overrides == {}
    assert set(config.modules) == {"maintenance"}


BAD = dedent("""\
    conf:
      maintenance:
        reboot:
          strategy: halt
          when: [tuesday]
          concurrency: 0
          window: {days: [mon, funday], start: "25:00", end: "5am", timezone: Mars/Olympus}
          blockers:
            pods: {selector: "app in ()"}
            alerts: {prometheus: prometheus:9090, match: "(unclosed"}
          drain: {timeout: 15 minutes, grace_period: 0s, on_timeout: wait, pod_seletor: x}
          health: {timeout: -5}
""")


def test_every_problem_is_reported_at_its_path() -> None:
    found = problems(BAD)
    expected = [
        "conf.maintenance.reboot.strategy: 'halt' is not allowed: expected "
        "'reboot', 'kexec', 'poweroff' or 'none' (doc.yaml:4)",
        "conf.maintenance.reboot.when[0]: 'tuesday' is not allowed",
        "conf.maintenance.reboot.concurrency:",
        "conf.maintenance.reboot.window.days[1]: 'funday' is not a day",
        "conf.maintenance.reboot.window.start: '25:00' is not a time of day",
        "conf.maintenance.reboot.window.end: '5am' is not a time of day",
        "conf.maintenance.reboot.window.timezone: 'Mars/Olympus' is not a time zone",
        "conf.maintenance.reboot.blockers.pods.selector: 'app in ()': `in` needs at least",
        "conf.maintenance.reboot.blockers.alerts.prometheus: 'prometheus:9090' is not an "
        "http(s) URL",
        "conf.maintenance.reboot.blockers.alerts.match: '(unclosed' is not a regular "
        "expression",
        "conf.maintenance.reboot.drain.timeout: '15 minutes' is not a duration",
        "conf.maintenance.reboot.drain.grace_period: must be longer than zero",
        "conf.maintenance.reboot.drain.on_timeout: 'wait' is not allowed",
        "conf.maintenance.reboot.drain.pod_seletor: unknown key 'pod_seletor'; did you mean "
        "'pod_selector'?",
        "conf.maintenance.reboot.health.timeout: must be longer than zero",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected), found


def test_an_override_is_checked_merged_over_the_base() -> None:
    text = ISSUE_EXAMPLE.replace("reboot: {strategy: none}",
                                 "reboot: {window: {start: '03:00', end: '03:00'}}")
    assert problems(text) == [
        "conf.overrides.divingbell_maintenance.hosts[0].conf.maintenance.reboot.window: start "
        "and end are equal: a window needs a length (leave `window` out to allow maintenance "
        "at any time) (doc.yaml:30)"]
    wrong = ISSUE_EXAMPLE.replace("maintenance:\n              reboot: {strategy: none}",
                                  "sysctl: {a.b: 1}")
    assert problems(wrong) == [
        "conf.overrides.divingbell_maintenance.hosts[0].conf.sysctl: an override of "
        "divingbell_maintenance may only set `maintenance`; put it under "
        "conf.overrides.divingbell_sysctl (doc.yaml:29)"]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400),
                                               ("2h", 7200), (45, 45), ("120", 120),
                                               ("0.5s", 0.5), ("1m2.5s", 62.5)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15 m", "1d", "m", "-5", True, ".5s", "0s"])
def test_bad_durations(text: str | bool) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
