"""`render` masks every secret, in text and JSON: password hashes, exec env values, debconf
password answers, URL passwords and mount password options; what is not secret stays."""

from __future__ import annotations

import json
from pathlib import Path

from divingbell.core.document.secrets import MASK
from tests.conftest import Cli

SECRETS = ("$6$salt$hashhashhash", "s3cr3t-token", "hunter2", "mirrorpass", "cifspass")
DOC = """\
conf:
  uamlite:
    users:
      - user_name: bob
        user_crypt_passwd: "$6$salt$hashhashhash"
  apt:
    packages:
      - name: foo
        debconf:
          - {question: foo/pw, question_type: password, answer: hunter2}
          - {question: foo/mode, question_type: string, answer: fast}
    repositories:
      internal:
        url: https://deploy:mirrorpass@mirror.example/debian
        distributions: [bookworm]
        components: [main]
  mounts:
    share:
      mnt_tgt: /mnt/share
      device: //fs/share
      type: cifs
      options: username=svc,password=cifspass,vers=3.0
  exec:
    hello.sh:
      data: "#!/bin/sh\\necho hi\\n"
      env:
        API_TOKEN: s3cr3t-token
        REGION: eu-1
"""


def test_render_masks_every_secret_in_text_and_json(cli: Cli, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(DOC)
    text = cli("render", site, "--node", "n1")
    as_json = cli("render", site, "--node", "n1", "--format", "json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    for output in (text.stdout, as_json.stdout):
        for secret in SECRETS:
            assert secret not in output
    data = json.loads(as_json.stdout)
    assert data["exec"]["hello.sh"]["env"] == {"API_TOKEN": MASK, "REGION": MASK}
    assert [a["answer"] for a in data["apt"]["packages"][0]["debconf"]] == [MASK, "fast"]
    assert data["apt"]["repositories"]["internal"]["url"] == (
        f"https://deploy:{MASK}@mirror.example/debian")
    assert data["mounts"]["share"]["options"] == f"username=svc,password={MASK},vers=3.0"
    assert data["uamlite"]["users"][0]["user_crypt_passwd"] == MASK
    assert data["uamlite"]["users"][0]["user_name"] == "bob"
    assert "API_TOKEN" in text.stdout and "username=svc" in text.stdout
