"""Divingbell's own documents load unchanged: chart keys are ignored with one notice, module
keys stay strict, subrepos expand, overrides for non-modules warn."""

from __future__ import annotations

from textwrap import dedent

import pytest

from divingbell.core.document.api import load_document, node_config
from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import validate
from divingbell.core.errors import DocumentError
from divingbell.core.modules.apt import render_source
from tests.compat.conftest import DATA


def test_the_chart_values_file_loads_with_one_notice_naming_the_chart_keys() -> None:
    document = load_document([DATA / "values.yaml"])
    assert len(document.notes) == 1
    note = document.notes[0]
    for key in ("images", "pod", "manifests", "conf.chroot_mnt_path", "conf.log_colors"):
        assert key in note
    config = node_config(document, "node1", {})
    assert "telnetd" in config.modules["apt"].blacklistpkgs


def test_a_site_values_file_layered_over_the_chart_values() -> None:
    document = load_document([DATA / "values.yaml", DATA / "site-values.yaml"])
    first = document.notes[0]
    for key in ("labels", "network_policy", "dependencies", "endpoints", "release_group",
                "secrets", "conf.extra_verbose"):
        assert key in first
    assert any("divingbell_sysclt" in n and "did you mean divingbell_sysctl" in n
               for n in document.notes)
    config = node_config(document, "superhost", {})
    assert config.modules["sysctl"].root["net.ipv4.ip_forward"] == "0"


def test_keys_inside_a_module_stay_strict_in_a_chart_values_file() -> None:
    text = (DATA / "values.yaml").read_text().replace("\n  apt:\n", "\n  apt:\n    upgrde: true\n", 1)
    with pytest.raises(DocumentError) as caught:
        validate(load_text(text, "values.yaml"))
    assert [str(p) for p in caught.value.problems] == [
        "conf.apt.upgrde: unknown key 'upgrde'; did you mean 'upgrade'? (values.yaml:28)"]


def test_an_unknown_top_level_key_that_is_not_a_chart_key_is_still_an_error() -> None:
    with pytest.raises(DocumentError) as caught:
        validate(load_text("cnf:\n  sysctl: {}\n", "d.yaml"))
    assert "did you mean 'conf'" in str(caught.value)


def test_subrepos_expand_to_distribution_suites() -> None:
    document = load_document([DATA / "site-values.yaml"])
    apt = node_config(document, "n", {}).modules["apt"]
    source = render_source("debian", apt.repositories["debian"])
    assert "Suites: bookworm bookworm-backports bookworm-updates\n" in source


def test_subrepos_on_a_flat_repository_are_refused() -> None:
    text = dedent("""\
        conf:
          apt:
            repositories:
              local: {url: "file:/srv/repo", distributions: ["./"], subrepos: [updates]}
        """)
    with pytest.raises(DocumentError, match=r"flat repository \(distribution ending in /\) has no subrepos"):
        validate(load_text(text))


def test_an_override_for_a_non_module_is_ignored_with_a_suggestion() -> None:
    text = dedent("""\
        conf:
          overrides:
            divingbell_nothing: {hosts: [{name: a, conf: {}}]}
        """)
    document = validate(load_text(text, "d.yaml"))
    assert document.notes == [
        "conf.overrides.divingbell_nothing does not override a divingbell module; ignored "
        "(modules: divingbell_sysctl, divingbell_limits, divingbell_mounts, divingbell_ethtool,"
        " divingbell_apt, divingbell_uamlite, divingbell_perm, divingbell_apparmor, "
        "divingbell_kernel, divingbell_exec, divingbell_maintenance) (d.yaml:3)"]
