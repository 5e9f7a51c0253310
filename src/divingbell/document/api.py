"""The document entry points the CLI and the agent share."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from divingbell.document.loader import load_files, load_text
from divingbell.document.validate import NodeConfig, ValidDocument, resolve, validate
from divingbell.errors import DocumentError, Problem


def load_document(files: Iterable[Path], *, allow_empty: bool = False) -> ValidDocument:
    """Load, merge and validate; raises DocumentError listing every problem."""
    return validate(load_files(files), allow_empty=allow_empty)


def allows_mass_removal(document: ValidDocument) -> bool:
    """The document says removing more than it keeps is intended: `allow_mass_removal: true`,
    or `conf: {}` written out (an explicit "nothing here")."""
    return document.model.allow_mass_removal or document.loaded.data.get("conf") == {}


def load_document_text(data: bytes | str, name: str) -> ValidDocument:
    """Like load_document, for a document received as bytes (the fleet service's PUT): the
    same loader and validation, problems located as `name:line`."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError([Problem("", f"not UTF-8 text (byte {exc.start})", name)]) from None
    return validate(load_text(data, name))


def revision(document: ValidDocument) -> str:
    """A short, stable digest of the merged document: the revision a node converged to."""
    canonical = json.dumps(document.loaded.data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def node_config(document: ValidDocument, node: str, labels: Mapping[str, str]) -> NodeConfig:
    return resolve(document, node, labels)


def effective_document(document: ValidDocument, config: NodeConfig) -> dict[str, Any]:
    """A node's effective configuration as a complete document with no overrides (what
    `render` shows, plus `drift`): loading it gives that node the same configuration.
    Unlike `NodeConfig.dump`, secret fields (crypt hashes) keep their value, since the node
    needs them to converge."""
    from pydantic import SecretStr, TypeAdapter

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [reveal(v) for v in value]
        return value

    conf = {name: reveal(model.model_dump(mode="python", exclude_none=True, by_alias=False))
            for name, model in config.modules.items()}
    dumped: dict[str, Any] = TypeAdapter(dict[str, Any]).dump_python(
        {"drift": document.model.drift, "conf": conf}, mode="json")
    return dumped
