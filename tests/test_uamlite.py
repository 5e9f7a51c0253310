"""uamlite in a real Debian root (chroot into a per-test overlay): accounts, keys, sudo, expiry,
purge, UID stability, never touching accounts divingbell did not create, the lockout guard."""

from __future__ import annotations

import json
import stat
import subprocess

import pytest

from divingbell.commands.output import plan_text
from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.engine.journal import LAST_RUN_FILE
from divingbell.core.engine.runner import ApplyReport, apply_node, plan_node
from divingbell.core.host import Host

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = []
    for index in range(2):
        path = tmp_path_factory.mktemp("keys") / f"id{index}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"key{index}",
                        "-f", str(path)], check=True)
        out.append(path.with_suffix(".pub").read_text().strip())
    return out


def apply(host: Host, text: str) -> ApplyReport:
    return apply_node(host, resolve(validate(load_text(text)), "n1", {}), "r")


def doc(users: str, **extra: object) -> str:
    options = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in extra.items())
    return f"conf:\n  uamlite:\n{options}    users:\n{users}"


def user(name: str, key: str | None, sudo: bool = True, extra: str = "") -> str:
    keys = f"        user_sshkeys: [{json.dumps(key)}]\n" if key else ""
    return f"      - user_name: {name}\n        user_sudo: {str(sudo).lower()}\n{keys}{extra}"


def passwd(host: Host, name: str) -> list[str] | None:
    for line in (host.read_text("/etc/passwd") or "").splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    return None


def shadow_expire(host: Host, name: str) -> str:
    for line in (host.read_text("/etc/shadow") or "").splitlines():
        if line.split(":")[0] == name:
            return line.split(":")[7]
    raise KeyError(name)


def test_create_noop_expire_readd_and_purge(debian_host: Host, keys: list[str]) -> None:
    both = doc(user("ops", keys[0]) + user("dev", keys[1]))
    report = apply(debian_host, both)
    assert report.ok, report.as_dict()
    ops = passwd(debian_host, "ops")
    assert ops is not None and ops[6] == "/bin/bash" and ops[5] == "/home/ops"
    uid = int(ops[2])
    authorized = debian_host.path("/home/ops/.ssh/authorized_keys")
    assert keys[0] in authorized.read_text()
    info, dir_info = authorized.stat(), authorized.parent.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o600)
    assert (dir_info.st_uid, stat.S_IMODE(dir_info.st_mode)) == (uid, 0o700)
    sudoers = debian_host.path("/etc/sudoers.d/divingbell-ops")
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    debian_host.run(["visudo", "-c", "-q"])  # the host's whole sudo config still parses

    assert apply(debian_host, both).applied == []

    only_ops = doc(user("ops", keys[0]))
    expired = apply(debian_host, only_ops)
    assert expired.ok, expired.as_dict()
    assert shadow_expire(debian_host, "dev") == "1"
    assert passwd(debian_host, "dev") is not None, "account and UID kept"
    assert debian_host.path("/home/dev").is_dir(), "home kept"
    assert not debian_host.path("/etc/sudoers.d/divingbell-dev").exists()

    dev_uid = int((passwd(debian_host, "dev") or [])[2])
    back = apply(debian_host, both)
    assert back.ok
    assert shadow_expire(debian_host, "dev") == ""
    assert int((passwd(debian_host, "dev") or [])[2]) == dev_uid, "same account back"

    purged = apply(debian_host, doc(user("ops", keys[0]), purge_expired_users=True))
    assert purged.ok, purged.as_dict()
    assert passwd(debian_host, "dev") is None
    assert not debian_host.path("/home/dev").exists()


def test_accounts_divingbell_did_not_create_are_never_expired(debian_host: Host,
                                                               keys: list[str]) -> None:
    assert passwd(debian_host, "root") is not None
    apply(debian_host, doc(user("ops", keys[0]) + user("root", keys[1], sudo=False)))
    root_keys = debian_host.path("/root/.ssh/authorized_keys")
    assert keys[1] in root_keys.read_text()
    gone = apply(debian_host, doc(user("ops", keys[0])))
    assert gone.ok, gone.as_dict()
    assert shadow_expire(debian_host, "root") == "", "root is never expired"
    assert not root_keys.exists(), "root had no authorized_keys before: removed again"


def test_a_pre_existing_authorized_keys_file_is_restored(debian_host: Host,
                                                        keys: list[str]) -> None:
    debian_host.run(["useradd", "--create-home", "image-user"])
    original = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKMwqv5P+4nwfcEw2CN4AJwFjQY4JpwzGHn3aT2Vc3Jr old\n"
    uid, gid = debian_host.user_ids("image-user")
    debian_host.write_atomic("/home/image-user/.ssh/authorized_keys", original, 0o600,
                             owner=(uid, gid), dir_mode=0o700)
    apply(debian_host, doc(user("ops", keys[0]) + user("image-user", keys[1], sudo=False)))
    apply(debian_host, doc(user("ops", keys[0])))
    restored = debian_host.path("/home/image-user/.ssh/authorized_keys")
    assert restored.read_text() == original
    assert restored.stat().st_uid == uid, "put back with its owner"
    assert shadow_expire(debian_host, "image-user") == ""


def test_removing_the_only_way_in_is_refused(debian_host: Host, keys: list[str]) -> None:
    assert apply(debian_host, doc(user("ops", keys[0]))).ok
    refused = apply(debian_host, doc(user("dev", None)))
    assert not refused.ok
    assert "would leave no way in" in refused.plan.errors[0]
    assert "(today: ops)" in refused.plan.errors[0]
    assert shadow_expire(debian_host, "ops") == "", "nothing changed"
    allowed = apply(debian_host, doc(user("dev", None), allow_lockout=True))
    assert allowed.ok
    assert shadow_expire(debian_host, "ops") == "1"


def test_password_hashes_never_reach_output_or_state(debian_host: Host, keys: list[str]) -> None:
    secret = "$6$saltsalt$" + "h" * 86
    text = doc(user("ops", keys[0], extra=f"        user_crypt_passwd: '{secret}'\n"))
    plan = plan_node(debian_host, resolve(validate(load_text(text)), "n1", {}))
    assert "hhhh" not in plan_text(plan, verbose=True)
    assert "hhhh" not in json.dumps(plan.as_dict())
    report = apply(debian_host, text)
    assert report.ok
    assert f"ops:{secret}:" in (debian_host.read_text("/etc/shadow") or "")
    assert "hhhh" not in (debian_host.read_text(LAST_RUN_FILE) or "")
    assert "hhhh" not in (debian_host.read_text("/var/lib/divingbell/journal.json") or "")
    assert apply(debian_host, text).applied == [], "same hash: nothing to do"


def test_unmanaged_keys_are_left_alone(debian_host: Host, keys: list[str]) -> None:
    apply(debian_host, doc(user("ops", keys[0])))
    report = apply(debian_host, doc(user("ops", None, extra="        user_sshkeys: [Unmanaged]\n")))
    assert report.ok, report.as_dict()
    assert keys[0] in (debian_host.read_text("/home/ops/.ssh/authorized_keys") or "")
    assert apply(debian_host, doc(user("dev", None), allow_lockout=True)).ok
    assert keys[0] in (debian_host.read_text("/home/ops/.ssh/authorized_keys") or ""), \
        "no longer divingbell's: never deleted"
