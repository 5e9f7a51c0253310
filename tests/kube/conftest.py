"""The two-agent world (tests/kube/agents.py) and the real nodes (tests/kube/node.py) for
every test module here."""

from tests.kube.agents import agents  # noqa: F401
from tests.kube.node import real_nodes  # noqa: F401
