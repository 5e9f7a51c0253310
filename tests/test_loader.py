from pathlib import Path

import pytest

from divingbell.core.document.loader import deep_merge, load_files, load_text
from divingbell.core.errors import DocumentError
from tests.conftest import write


def test_yaml11_booleans_are_kept_for_nic_settings() -> None:
    loaded = load_text("conf:\n  ethtool:\n    ens3:\n      tx-tcp-segmentation: off\n")
    assert loaded.data["conf"]["ethtool"]["ens3"]["tx-tcp-segmentation"] is False


def test_octal_and_sexagesimal_ints_stay_as_written() -> None:
    loaded = load_text("a: 0640\nb: 1:20\nc: 10\n")
    assert loaded.data == {"a": "0640", "b": "1:20", "c": 10}


def test_keys_are_the_text_as_written() -> None:
    assert load_text("on: 1\n'no': 2\n").data == {"on": 1, "no": 2}


def test_duplicate_keys_are_errors_with_both_lines() -> None:
    with pytest.raises(DocumentError) as err:
        load_text("conf:\n  sysctl:\n    a.b: 1\n    a.b: 2\n", "site.yaml")
    (problem,) = err.value.problems
    assert problem.path == 'conf.sysctl["a.b"]'
    assert problem.location == "site.yaml:4"
    assert "first defined at site.yaml:3" in problem.message


def test_every_duplicate_is_reported() -> None:
    with pytest.raises(DocumentError) as err:
        load_text("a: 1\na: 2\nb:\n  c: 1\n  c: 1\n")
    assert len(err.value.problems) == 2


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(DocumentError) as err:
        load_text("conf:\n  sysctl: [\n", "bad.yaml")
    assert err.value.problems[0].location is not None
    assert err.value.problems[0].location.startswith("bad.yaml:")


def test_marks_point_at_keys() -> None:
    loaded = load_text("conf:\n  mounts:\n    mnt:\n      device: tmpfs\n", "m.yaml")
    assert loaded.location(("conf", "mounts", "mnt", "device")) == "m.yaml:4"
    assert loaded.location(("conf", "mounts", "mnt", "mnt_tgt")) == "m.yaml:3"


def test_layered_files_merge_mappings_and_replace_lists(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml",
                 "conf:\n  sysctl:\n    a.b: 1\n    c.d: 2\n  perm:\n    paths: [1, 2]\n")
    site = write(tmp_path / "site.yaml", "conf:\n  sysctl:\n    c.d: 3\n  perm:\n    paths: [9]\n")
    loaded = load_files([base, site])
    assert loaded.data["conf"]["sysctl"] == {"a.b": 1, "c.d": 3}
    assert loaded.data["conf"]["perm"]["paths"] == [9]
    assert loaded.location(("conf", "sysctl", "c.d")) == f"{site}:3"
    assert loaded.location(("conf", "sysctl", "a.b")) == f"{base}:3"


def test_problems_in_every_file_are_reported(tmp_path: Path) -> None:
    one = write(tmp_path / "one.yaml", "a: 1\na: 1\n")
    two = write(tmp_path / "two.yaml", "b: [\n")
    with pytest.raises(DocumentError) as err:
        load_files([one, two])
    assert {p.location.split(":")[0] for p in err.value.problems if p.location} == {
        str(one), str(two)
    }


def test_deep_merge_does_not_mutate_inputs() -> None:
    base = {"a": {"b": 1}}
    merged = deep_merge(base, {"a": {"c": 2}})
    assert merged == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}}
