"""The loader+validator fuzz run, as a script: `pytest tests/hardening/test_yaml.py` runs it in
a child process whose address space and CPU time the kernel limits (RLIMIT_AS, RLIMIT_CPU), so
an input that made the loader hang or balloon would kill the run instead of passing.

Prints `fuzz inputs: N` at the end. Every input must end in a valid document or a
DocumentError whose every problem has a message; anything else is a failure."""

from __future__ import annotations

import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from divingbell.core.document.loader import load_text
from divingbell.core.document.validate import resolve, validate
from divingbell.core.errors import DocumentError

COUNT = [0]

SCALARS = st.one_of(
    st.sampled_from(["1", "-1", "0x10", "0o17", "0640", "1:20", ".inf", "-.Inf", ".nan", "~",
                     "null", "yes", "off", "2001-12-14", "2001-13-45", "'quoted'", '"a\\0b"',
                     '"line\\nbreak"', "9" * 60, "1e999", "!!float abc", "!!int x",
                     "!!timestamp 2001-13-45", "!!foo 1", "!!binary aGk=", "!!python/none ''",
                     "&a 1", "*a", "*nope", "<<: 5", "[", "{", "]", "'", '"', "- ", ": ", "\t",
                     "@x", "`x", "%YAML 1.1", "---", "..."]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
)
KEYS = st.sampled_from(["conf", "sysctl", "limits", "mounts", "ethtool", "apt", "uamlite",
                        "perm", "apparmor", "exec", "overrides", "users", "paths", "packages",
                        "data", "env", "args", "mnt_tgt", "device", "type", "after", "<<",
                        "user_name", "user_sshkeys", "net.ipv4.ip_forward", "divingbell_perm",
                        "hosts", "labels", "name", "path", "owner", "group", "permissions",
                        "rerun_interval", "timeout", "allow_mass_removal", "drift", "? x"])


def render(value: object, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        return "".join(f"{pad}{k}:\n{render(v, indent + 2)}" if isinstance(v, dict | list)
                       else f"{pad}{k}: {v}\n" for k, v in value.items()) or f"{pad}{{}}\n"
    if isinstance(value, list):
        return "".join(f"{pad}- {v}\n" if not isinstance(v, dict | list)
                       else f"{pad}-\n{render(v, indent + 2)}" for v in value) or f"{pad}[]\n"
    return f"{pad}{value}\n"


TREES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=25)
DOCUMENTS = st.one_of(
    TREES.map(lambda t: render({"conf": t})),
    TREES.map(render),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
    st.tuples(TREES.map(lambda t: render({"conf": t})), st.integers(0, 400)).map(
        lambda pair: pair[0][: pair[1]]),  # truncated documents
    st.integers(1, 12).map(lambda n: "a: &a [x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 9)}]\n"
        for i in range(n))),  # laughs of every size
    st.integers(1, 200).map(lambda n: "conf: " + "[" * n + "]" * n),
    st.integers(1, 200).map(lambda n: "conf: " + "{a: " * n + "1" + "}" * n),
)


@settings(max_examples=int(sys.argv[1]) if len(sys.argv) > 1 else 500, deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(DOCUMENTS)
def fuzz(text: str) -> None:
    COUNT[0] += 1
    try:
        document = validate(load_text(text, "fuzz.yaml"))
        resolve(document, "n1", {"role": "x"})
    except DocumentError as exc:
        assert exc.problems
        assert all(problem.message for problem in exc.problems)


if __name__ == "__main__":
    fuzz()
    print(f"fuzz inputs: {COUNT[0]}")
