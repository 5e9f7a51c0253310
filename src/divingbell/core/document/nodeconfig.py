"""What one node gets from a validated document. Plain data (no pydantic import), so the engine
and a cached document load fast."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from divingbell.core.document.paths import PathKey


@dataclass(frozen=True)
class Applied:
    """Which override a module got on a node, for plan and render output."""

    kind: str  # "host" or "label"
    path: PathKey
    description: str


@dataclass(frozen=True)
class NodeConfig:
    """The effective configuration of one node: one validated model per module present.

    A model is the schema's pydantic model, or (from the validated-document cache) a light
    object with the same attributes (`document.frozen`)."""

    node: str
    labels: Mapping[str, str]
    modules: dict[str, Any]
    overrides: dict[str, Applied]

    def dump(self) -> dict[str, Any]:
        """In the document's own shape, one key per module (secrets masked)."""
        from divingbell.core.document.secrets import mask_secrets

        return {
            name: mask_secrets(name, model.model_dump(mode="json", exclude_none=True,
                                                      by_alias=False))
            for name, model in self.modules.items()
        }
