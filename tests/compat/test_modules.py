"""Module behaviour the compatibility review found wrong, each against a real host: a Debian
root (chroot into a per-test overlay) for accounts and packages, veth in a namespace for NICs."""

from __future__ import annotations

import pytest

from divingbell.host import Host
from divingbell.output import plan_text
from tests.test_uamlite import apply, doc, user

pytestmark = pytest.mark.kernel

SECRET = "$6$saltsalt$" + "h" * 86


def shadow_field(host: Host, name: str) -> str:
    for line in (host.read_text("/etc/shadow") or "").splitlines():
        if line.split(":")[0] == name:
            return line.split(":")[1]
    raise KeyError(name)


def test_removing_a_password_locks_it_and_the_plan_says_so(debian_host: Host) -> None:
    from divingbell.document.loader import load_text
    from divingbell.document.validate import resolve, validate
    from divingbell.engine.runner import plan_node

    with_password = doc(user("ops", None, sudo=False,
                             extra=f"        user_crypt_passwd: '{SECRET}'\n"))
    assert apply(debian_host, with_password).ok
    assert shadow_field(debian_host, "ops") == SECRET
    without = doc(user("ops", None, sudo=False))
    plan = plan_node(debian_host, resolve(validate(load_text(without)), "n1", {}))
    text = plan_text(plan)
    assert "  ~ user ops password: set -> locked" in text
    assert "hhhh" not in text
    report = apply(debian_host, without)
    assert report.ok, report.as_dict()
    assert shadow_field(debian_host, "ops") == "!", "no hash left: password login is impossible"
    assert apply(debian_host, without).applied == [], "locked once; nothing to do after"


def test_a_password_divingbell_never_set_is_left_alone(debian_host: Host) -> None:
    """root's own password (set by the installer) is not divingbell's to lock."""
    before = shadow_field(debian_host, "root")
    assert apply(debian_host, doc(user("root", None, sudo=False))).ok
    assert shadow_field(debian_host, "root") == before
