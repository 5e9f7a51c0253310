"""The command as a user meets it: exit codes, text and JSON output, help."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from divingbell import __version__
from tests.conftest import Cli, write
from tests.test_overrides import SEED_EXAMPLE
from tests.test_validate import SEED_DIVINGBELL


def test_version_and_help(cli: Cli) -> None:
    assert cli("--version").stdout.strip() == f"divingbell, version {__version__}"
    top = cli("--help").stdout
    for command in ("validate", "render", "plan", "apply", "status", "schema"):
        assert command in top
    assert "--root" in cli("apply", "--help").stdout


def test_help_lists_every_command_group_without_importing_it(cli: Cli) -> None:
    import importlib

    import click

    from divingbell.commands.cli import LAZY_COMMANDS
    from tests.test_fast_path import imported_modules

    result = cli("--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    for name, (target, summary) in LAZY_COMMANDS.items():
        assert f"  {name}" in result.stdout and summary in result.stdout, name
        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command) and command.name == name
    imported = imported_modules(result.stderr)
    assert "divingbell.commands.cli" in imported
    assert not {target.partition(":")[0] for target, _ in LAZY_COMMANDS.values()} & imported
    assert not imported & {"pydantic", "yaml", "fastapi"}, sorted(imported)


def test_validate_ok_and_invalid_exit_codes(cli: Cli, tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", SEED_DIVINGBELL)
    ok = cli("validate", good)
    assert ok.returncode == 0, ok.stderr
    bad = write(tmp_path / "bad.yaml", "conf:\n  mounts:\n    mnt: {device: tmpfs, type: tmpfs}\n")
    result = cli("validate", bad)
    assert result.returncode == 2
    assert f"conf.mounts.mnt.mnt_tgt: field required ({bad}:3)" in result.stderr


def test_validate_json(cli: Cli, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "conf:\n  sysctll: {}\n")
    result = json.loads(cli("validate", bad, "--format", "json").stdout)
    assert result["valid"] is False
    assert result["problems"] == [{
        "path": "conf.sysctll",
        "message": "unknown key 'sysctll'; did you mean 'sysctl'?",
        "location": f"{bad}:2",
    }]


def test_layered_files_validate_merged(cli: Cli, tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "conf:\n  mounts:\n    mnt: {device: tmpfs, type: tmpfs}\n")
    site = write(tmp_path / "site.yaml", "conf:\n  mounts:\n    mnt: {mnt_tgt: /mnt}\n")
    assert cli("validate", base).returncode == 2
    assert cli("validate", base, site).returncode == 0


def test_invalid_document_changes_nothing_on_apply(cli: Cli, tmp_path: Path, root: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "conf:\n  sysctl:\n    net.ipv4.ip_forward: [1]\n")
    result = cli("apply", bad, "--root", root)
    assert result.returncode == 2
    assert "nothing was changed" in result.stderr
    assert list(root.iterdir()) == []


def test_render_seed_example_for_a_labelled_node(cli: Cli, tmp_path: Path) -> None:
    doc = write(tmp_path / "seed.yaml", SEED_EXAMPLE)
    out = cli("render", doc, "--node", "n1", "--label", "compute_type=dpdk")
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)
    assert rendered == {"sysctl": {"net.ipv4.ip_forward": "0",
                                   "net.ipv6.conf.all.forwarding": "1", "fs.file-max": "9999"}}
    assert "# sysctl: label override compute_type=dpdk" in out.stdout
    as_json = json.loads(cli("render", doc, "--node", "superhost", "--format", "json").stdout)
    assert as_json["sysctl"]["fs.file-max"] == "12345"


def test_render_masks_password_hashes(cli: Cli, tmp_path: Path) -> None:
    doc = write(tmp_path / "u.yaml", "conf:\n  uamlite:\n    users:\n      - user_name: bob\n"
                "        user_crypt_passwd: $6$salt$hashhashhash\n")
    out = cli("render", doc, "--node", "n1")
    assert "hashhash" not in out.stdout
    assert "**********" in out.stdout


def test_bad_label_syntax_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    doc = write(tmp_path / "d.yaml", "conf: {}\n")
    result = cli("render", doc, "--label", "novalue")
    assert result.returncode == 2
    assert "'novalue' is not KEY=VALUE" in result.stderr


def test_schema_accepts_the_seed_and_rejects_unknown_keys(cli: Cli) -> None:
    schema = json.loads(cli("schema").stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for text in (SEED_DIVINGBELL, SEED_EXAMPLE):
        errors = list(validator.iter_errors(yaml.safe_load(text)))
        assert errors == [], [e.message for e in errors]
    assert list(validator.iter_errors({"conf": {"sysctll": {}}}))
    assert list(validator.iter_errors({"conf": {"ethtool": {"ens3": {"tso": [1]}}}}))


def test_status_on_a_fresh_host(cli: Cli, root: Path) -> None:
    text = cli("status", "--root", root)
    assert text.returncode == 0
    assert "Owns nothing on this host." in text.stdout
    assert "Last apply: never" in text.stdout
