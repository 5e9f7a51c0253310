"""The two-agent world (tests/kube/agents.py) for every test module here."""

from tests.kube.agents import agents  # noqa: F401
