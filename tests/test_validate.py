"""Validation: every problem, with its path and file:line, and nothing secret in messages."""

from textwrap import dedent

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import validate
from divingbell.core.errors import DocumentError

SEED_DIVINGBELL = dedent("""\
    conf:
      sysctl:
        net/ipv4/ip_forward: 1
        net/ipv6/conf/all/forwarding: 1
      mounts:
        mnt:
          mnt_tgt: /mnt
          device: tmpfs
          type: tmpfs
          options: 'defaults,noatime,nosuid,nodev,noexec,mode=1777,size=1024M'
      ethtool:
        ens3:
          tx-tcp-segmentation: off
          tx-checksum-ip-generic: on
      uamlite:
        purge_expired_users: false
        users:
          - user_name: testuser
            user_sudo: True
            user_sshkeys:
              - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKMwqv5P+4nwfcEw2CN4AJwFjQY4JpwzGHn3aT2Vc3Jr key1
      limits:
        nofile:
          domain: 'root'
          type: 'soft'
          item: 'nofile'
          value: '101'
        core_dump:
          domain: '0:'
          type: 'hard'
          item: 'core'
          value: 0
      perm:
        paths:
          - path: '/etc/shadow'
            owner: 'root'
            group: 'shadow'
            permissions: '0640'
      apparmor:
        complain_mode: "true"
        profiles:
          profile-1: |
            #include <tunables/global>
            /usr/sbin/profile-1 { }
      apt:
        upgrade: false
        packages:
          - name: openssh-server
            debconf:
              - question: openssh-server/permit-root-login
                question_type: boolean
                answer: false
        blacklistpkgs:
          - telnetd
      exec:
        001-script1.sh:
          blocking_policy: foreground_halt_pod_on_failure
          env: {env1: env1-val}
          args: [arg1]
          data: |
            #!/bin/bash
            echo hi
""")


def problems_of(text: str) -> list[str]:
    with pytest.raises(DocumentError) as err:
        validate(load_text(text, "doc.yaml"))
    return [str(p) for p in err.value.problems]


def test_every_documented_divingbell_example_is_accepted() -> None:
    doc = validate(load_text(SEED_DIVINGBELL, "seed.yaml")).model
    assert doc.conf.ethtool is not None
    assert doc.conf.ethtool.root["ens3"].features == {
        "tx-tcp-segmentation": False, "tx-checksum-ip-generic": True,
    }
    assert doc.conf.apparmor is not None and doc.conf.apparmor.complain_mode is True
    assert doc.conf.perm is not None and doc.conf.perm.paths[0].permissions == "0640"


def test_early_divingbell_perm_list_is_accepted() -> None:
    doc = validate(load_text(
        "conf:\n  perm:\n    - {path: /etc/passwd, owner: root, group: root, permissions: '0644'}\n"
    )).model
    assert doc.conf.perm is not None and doc.conf.perm.paths[0].path == "/etc/passwd"


def test_string_false_is_false_for_apparmor() -> None:
    doc = validate(load_text('conf:\n  apparmor:\n    complain_mode: "false"\n')).model
    assert doc.conf.apparmor is not None and doc.conf.apparmor.complain_mode is False


def test_missing_field_is_reported_with_path_and_line() -> None:
    problems = problems_of("conf:\n  mounts:\n    mnt:\n      device: tmpfs\n      type: tmpfs\n")
    assert problems == ["conf.mounts.mnt.mnt_tgt: field required (doc.yaml:3)"]


def test_unknown_keys_are_errors_with_a_suggestion() -> None:
    problems = problems_of(
        "conf:\n  sysctll: {}\n  mounts:\n    m:\n      mnt_tgt: /m\n      device: d\n"
        "      type: t\n      optoins: x\n"
    )
    assert "conf.sysctll: unknown key 'sysctll'; did you mean 'sysctl'? (doc.yaml:2)" in problems
    assert "conf.mounts.m.optoins: unknown key 'optoins'; did you mean 'options'? (doc.yaml:8)" \
        in problems


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(dedent("""\
        conf:
          limits:
            nofile: {domain: root, type: soft, item: nofiles, value: 10}
          perm:
            paths:
              - {path: /etc/x, owner: root, group: root, permissions: '0x755'}
          ethtool:
            ens3: {tx-tcp-segmentation: maybe}
          exec:
            a.sh: {data: x, rerun_interval: 5}
    """))
    assert len(problems) == 4
    assert any(p.startswith("conf.limits.nofile.item: 'nofiles' is not allowed") for p in problems)
    assert any("conf.perm.paths[0].permissions: '0x755' is not an octal mode" in p
               for p in problems)
    assert any(p.startswith("conf.ethtool.ens3.tx-tcp-segmentation: must be on or off")
               for p in problems)
    assert any(p.startswith('conf.exec["a.sh"].rerun_interval: must be at least 60')
               for p in problems)


def test_sysctl_key_spelled_twice_is_an_error() -> None:
    problems = problems_of("conf:\n  sysctl:\n    net.ipv4.ip_forward: 1\n    net/ipv4/ip_forward: 0\n")
    assert problems == [
        "conf.sysctl: 'net/ipv4/ip_forward' and 'net.ipv4.ip_forward' name the same sysctl "
        "(doc.yaml:2)"
    ]


def test_sysctl_values_must_be_scalars() -> None:
    problems = problems_of("conf:\n  sysctl:\n    net.ipv4.ip_forward: [1]\n")
    assert problems == ['conf.sysctl["net.ipv4.ip_forward"]: must be a number or a string, '
                        "not a list (doc.yaml:3)"]


def test_password_hash_errors_never_echo_the_value() -> None:
    problems = problems_of(
        "conf:\n  uamlite:\n    users:\n      - user_name: bob\n"
        "        user_crypt_passwd: hunter2-plaintext\n"
    )
    assert len(problems) == 1
    assert "hunter2" not in problems[0]
    assert problems[0].startswith("conf.uamlite.users[0].user_crypt_passwd: must be a crypt(3)")


def test_ssh_keys_are_checked_by_type_and_body() -> None:
    problems = problems_of(
        "conf:\n  uamlite:\n    users:\n      - user_name: bob\n        user_sshkeys:\n"
        "          - ssh-rsa AAAA!!!\n          - ssh-foo AAAA\n"
        "          - ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIKMwqv5P+4nwfcEw2CN4AJwFjQY4JpwzGHn3aT2Vc3Jr\n"
    )
    assert len(problems) == 3
    assert "not valid base64" in problems[0]
    assert "must start with one of" in problems[1]
    assert "does not encode a ssh-rsa key" in problems[2]


def test_override_for_one_module_may_not_set_another() -> None:
    problems = problems_of(dedent("""\
        conf:
          overrides:
            divingbell_sysctl:
              hosts:
                - name: h1
                  conf:
                    mounts: {}
    """))
    assert problems == [
        "conf.overrides.divingbell_sysctl.hosts[0].conf.mounts: an override of divingbell_sysctl "
        "may only set `sysctl`; put it under conf.overrides.divingbell_mounts (doc.yaml:7)"
    ]


def test_overrides_are_validated_merged_over_the_base() -> None:
    problems = problems_of(dedent("""\
        conf:
          mounts:
            mnt: {mnt_tgt: /mnt, device: tmpfs, type: tmpfs}
          overrides:
            divingbell_mounts:
              labels:
                - label: {key: a, values: [b]}
                  conf:
                    mounts:
                      mnt: {mnt_tgt: relative}
                      new: {device: x}
    """))
    assert problems == [
        "conf.overrides.divingbell_mounts.labels[0].conf.mounts.mnt.mnt_tgt: must be an absolute "
        "path, not 'relative' (doc.yaml:10)",
        "conf.overrides.divingbell_mounts.labels[0].conf.mounts.new.mnt_tgt: field required "
        "(doc.yaml:11)",
        "conf.overrides.divingbell_mounts.labels[0].conf.mounts.new.type: field required "
        "(doc.yaml:11)",
    ]


def test_a_base_problem_is_reported_once_not_per_override() -> None:
    problems = problems_of(dedent("""\
        conf:
          sysctl:
            bad key: 1
          overrides:
            divingbell_sysctl:
              hosts:
                - {name: a, conf: {sysctl: {net.ipv4.ip_forward: 0}}}
                - {name: b, conf: {sysctl: {net.ipv4.ip_forward: 1}}}
    """))
    assert problems == ["conf.sysctl: 'bad key' is not a sysctl key (doc.yaml:2)"]


def test_unknown_override_module_is_ignored_and_suggests_the_right_one() -> None:
    # Divingbell ignores overrides for daemonsets it does not have; so does divingbell, loudly.
    doc = validate(load_text("conf:\n  overrides:\n    divingbell_sysctls: {}\n", "doc.yaml"))
    assert doc.notes == ["conf.overrides.divingbell_sysctls does not override a divingbell "
                         "module; ignored (did you mean divingbell_sysctl?) (doc.yaml:3)"]


def test_chart_only_settings_are_accepted_with_a_note() -> None:
    doc = validate(load_text("conf:\n  chroot_mnt_path: /mnt\n  log_colors: false\n"))
    assert doc.notes == ["ignored Divingbell chart settings that mean nothing to divingbell on a "
                         "node: conf.chroot_mnt_path, conf.log_colors"]


def test_empty_document_needs_conf_or_allow_empty() -> None:
    # An empty or truncated file must never mean "remove everything" (issue 11, section 6).
    with pytest.raises(DocumentError, match="no `conf:`"):
        validate(load_text(""))
    assert validate(load_text(""), allow_empty=True).model.conf.sysctl is None
    assert validate(load_text("conf: {}\n")).model.conf.sysctl is None


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(DocumentError):
        validate(load_text("- a\n- b\n"))
