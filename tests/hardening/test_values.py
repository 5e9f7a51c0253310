"""Values the file or syscall they end up in cannot hold are refused by `validate`, with the
document path, before plan or apply can trip over them (issue 11, section 2)."""

from __future__ import annotations

import textwrap

import pytest

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import validate
from divingbell.core.errors import DocumentError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGKv9eU0ZP4B9hTL2cHmy1oExGv3A0kQfJ9pA3d5m1Yh"
HASH = "$6$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MTSuDDl3aCI6WouIL9AjRbLC"


def problems(text: str) -> list[str]:
    with pytest.raises(DocumentError) as caught:
        validate(load_text(textwrap.dedent(text), "doc.yaml"))
    return [str(p) for p in caught.value.problems]


MOUNT = "conf:\n  mounts:\n    m: {{mnt_tgt: /mnt/m, device: tmpfs, type: tmpfs, {field}}}\n"

CASES = {
    # A newline would add `Requires=...` to the unit file.
    "mount after newline": (MOUNT.format(field='after: "a.target\\nRequires=evil.service"'),
                            "conf.mounts.m.after"),
    "mount before trailing backslash": (MOUNT.format(field='before: "x.service \\\\"'),
                                        "conf.mounts.m.before"),
    "mount options newline": (MOUNT.format(field='options: "size=1M\\n[Service]"'),
                             "conf.mounts.m.options"),
    # A newline in a key comment would add a `command="/bin/sh"` line to authorized_keys.
    "ssh key newline": (f'conf:\n  uamlite:\n    users:\n      - user_name: bob\n'
                        f'        user_sshkeys: ["{KEY} c\\ncommand=\\"/bin/sh\\" {KEY}"]\n',
                        "conf.uamlite.users[0].user_sshkeys[0]"),
    "crypt hash newline": (f'conf:\n  uamlite:\n    users:\n      - user_name: bob\n'
                           f'        user_crypt_passwd: "{HASH}\\nroot:$6$x$y"\n',
                           "conf.uamlite.users[0].user_crypt_passwd"),
    "env name with =": ("conf:\n  exec:\n    s: {data: x, env: {'A=B': c}}\n",
                        "conf.exec.s.env"),
    "NUL in env value": ('conf:\n  exec:\n    s: {data: x, env: {A: "b\\0c"}}\n',
                         "conf.exec.s.env.A"),
    "NUL in argument": ('conf:\n  exec:\n    s: {data: x, args: ["a\\0b"]}\n',
                        "conf.exec.s.args[0]"),
    "NUL in script": ('conf:\n  exec:\n    s: {data: "echo\\0"}\n', "conf.exec.s.data"),
    "NUL in sysctl key": ('conf:\n  sysctl:\n    "net.ipv4\\0.ip_forward": 1\n', "conf.sysctl"),
    "newline in sysctl value": ('conf:\n  sysctl:\n    vm.swappiness: "10\\nkernel.x = 1"\n',
                                'conf.sysctl["vm.swappiness"]'),
    "uid out of range": ("conf:\n  perm:\n    paths:\n      - {path: /x, owner: "
                         "99999999999999999999, group: root, permissions: '0600'}\n",
                         "conf.perm.paths[0].owner"),
    "gid out of range": ("conf:\n  perm:\n    paths:\n      - {path: /x, owner: root, "
                         "group: '4294967295', permissions: '0600'}\n",
                         "conf.perm.paths[0].group"),
    "perm path with ..": ("conf:\n  perm:\n    paths:\n      - {path: /../../x/etc/shadow, "
                          "owner: root, group: root, permissions: '0600'}\n",
                          "conf.perm.paths[0].path"),
    "mount target with ..": (MOUNT.replace("/mnt/m", "/mnt/../etc").format(field="options: x"),
                             "conf.mounts.m.mnt_tgt"),
    "infinite interval": ("conf:\n  exec:\n    s: {data: x, rerun_interval: .inf}\n",
                          "conf.exec.s.rerun_interval"),
    "NaN timeout": ("conf:\n  exec:\n    s: {data: x, timeout: .nan}\n", "conf.exec.s.timeout"),
    "huge timeout": ("conf:\n  exec:\n    s: {data: x, timeout: 1000000000000}\n",
                     "conf.exec.s.timeout"),
    "fractional interval": ("conf:\n  exec:\n    s: {data: x, rerun_interval: 90.5}\n",
                            "conf.exec.s.rerun_interval"),
    "debconf answer newline": ("conf:\n  apt:\n    packages:\n      - name: tzdata\n"
                               "        debconf:\n          - {question: tzdata/Areas, "
                               'question_type: select, answer: "Etc\\nother/q select x"}\n',
                               "conf.apt.packages[0].debconf[0].answer"),
    "repository url newline": ("conf:\n  apt:\n    repositories:\n      r: {url: "
                               '"http://x/\\nTrusted: yes", distributions: [./]}\n',
                               "conf.apt.repositories.r.url"),
    # The name becomes /etc/apt/sources.list.d/divingbell-NAME.sources.
    "repository name with ..": ("conf:\n  apt:\n    repositories:\n      '../../../tmp/x': "
                                "{url: http://x/, distributions: [./]}\n",
                                "conf.apt.repositories"),
    "repository name apt ignores": ("conf:\n  apt:\n    repositories:\n      'a+b': "
                                    "{url: http://x/, distributions: [./]}\n",
                                    "conf.apt.repositories"),
    # deb822 separates items by spaces: this would add a second URI, a second suite.
    "repository url with a space": ("conf:\n  apt:\n    repositories:\n      r: {url: "
                                    "'http://x/ http://evil/', distributions: [./]}\n",
                                    "conf.apt.repositories.r.url"),
    "repository suite with a space": ("conf:\n  apt:\n    repositories:\n      r: {url: "
                                      "http://x/, distributions: ['a b'], components: [main]}\n",
                                      "conf.apt.repositories.r.distributions[0]"),
    "ethtool feature with a space": ("conf:\n  ethtool:\n    eth0: {'tso on; reboot': off}\n",
                                     "conf.ethtool"),
    "interface name with a quote": ("conf:\n  ethtool:\n    'eth0\"': {tso: off}\n",
                                    "conf.ethtool"),
    "limit value too long": ("conf:\n  limits:\n    l: {domain: '*', type: soft, item: nofile, "
                             "value: '" + "9" * 30 + "'}\n", "conf.limits.l.value"),
    "NUL in a label value": ('conf:\n  overrides:\n    divingbell_sysctl:\n      hosts:\n'
                             '        - {name: "n\\0", conf: {}}\n',
                             "conf.overrides.divingbell_sysctl.hosts[0].name"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_its_path(name: str) -> None:
    text, path = CASES[name]
    found = problems(text)
    assert any(p.startswith(path) for p in found), found
    assert all("(doc.yaml:" in p for p in found), found


def test_the_same_values_without_the_poison_are_fine() -> None:
    validate(load_text(textwrap.dedent(f"""\
        conf:
          mounts:
            m: {{mnt_tgt: /mnt/m, device: tmpfs, type: tmpfs, after: a.target, options: x%y}}
          uamlite:
            users:
              - user_name: bob
                user_sshkeys: ["{KEY} bob@laptop"]
                user_crypt_passwd: "{HASH}"
          exec:
            s: {{data: x, env: {{A_1: "multi\\nline is fine in env"}}, args: [a], timeout: 60}}
          perm:
            paths:
              - {{path: /x, owner: '4294967294', group: root, permissions: '0600'}}
        """)))


def test_a_percent_sign_reaches_the_unit_file_as_itself() -> None:
    from divingbell.core.modules.mounts import render_unit
    from divingbell.core.modules.mounts_schema import Mount

    unit = render_unit("m", Mount(mnt_tgt="/mnt/m", device="//srv/share%h", type="cifs"))
    assert "What=//srv/share%%h\n" in unit  # systemd reads %% as %, never a specifier
