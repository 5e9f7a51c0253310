"""The document entry points the CLI and the agent share."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from divingbell.document.loader import load_files
from divingbell.document.validate import NodeConfig, ValidDocument, resolve, validate


def load_document(files: Iterable[Path], *, allow_empty: bool = False) -> ValidDocument:
    """Load, merge and validate; raises DocumentError listing every problem."""
    return validate(load_files(files), allow_empty=allow_empty)


def allows_mass_removal(document: ValidDocument) -> bool:
    """The document says removing more than it keeps is intended: `allow_mass_removal: true`,
    or `conf: {}` written out (an explicit "nothing here")."""
    return document.model.allow_mass_removal or document.loaded.data.get("conf") == {}


def revision(document: ValidDocument) -> str:
    """A short, stable digest of the merged document: the revision a node converged to."""
    canonical = json.dumps(document.loaded.data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def node_config(document: ValidDocument, node: str, labels: Mapping[str, str]) -> NodeConfig:
    return resolve(document, node, labels)
