"""The interface every host module implements, the same way.

    observe(host, desired, record) -> observed    read the host; raise ModuleError for problems
    plan(desired, observed, record) -> [Change]   pure: decide, touch nothing
    apply(host, change, record) -> notes          carry out one change
    undo(host, change)                            put back what `apply` changed, for rollback

`desired` is the module's validated conf for this node, or None when the document no longer has
the module (then plan restores originals and removes owned files). The engine does the journal
bookkeeping every module shares (originals captured once, forgotten after restore); owned files
are handled by `engine.files`, and unit enablement by `modules.systemd`, so no module writes its
own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from divingbell.core.engine.change import Change
from divingbell.core.engine.files import apply_file, is_file_change, undo_file
from divingbell.core.engine.journal import ModuleRecord
from divingbell.core.host import Host
from divingbell.core.modules.systemd import Enablement, apply_enablement

if TYPE_CHECKING:
    from pydantic import BaseModel

# A schema model, or its light equivalent from the validated-document cache (same attributes).
ConfT = TypeVar("ConfT", bound="BaseModel | Any")
ObservedT = TypeVar("ObservedT")


class HostModule(ABC, Generic[ConfT, ObservedT]):
    name: ClassVar[str]

    @abstractmethod
    def observe(self, host: Host, desired: ConfT | None, record: ModuleRecord) -> ObservedT: ...

    @abstractmethod
    def plan(
        self, desired: ConfT | None, observed: ObservedT, record: ModuleRecord
    ) -> list[Change]: ...

    def apply(self, host: Host, change: Change, record: ModuleRecord) -> list[str]:
        """Carry out one change. Returns notes worth telling the operator (may be empty)."""
        if is_file_change(change):
            apply_file(host, change, record)
        elif isinstance(change.payload, Enablement):
            apply_enablement(host, change, record=record)
        elif change.changes_host:
            return self.apply_setting(host, change, record) or []
        return []

    def undo(self, host: Host, change: Change) -> None:
        if is_file_change(change):
            undo_file(host, change)
        elif isinstance(change.payload, Enablement):
            apply_enablement(host, change, undo=True)
        elif change.changes_host:
            self.undo_setting(host, change)

    def apply_setting(self, host: Host, change: Change, record: ModuleRecord) -> list[str] | None:
        raise NotImplementedError(f"{self.name} has no live settings")

    def undo_setting(self, host: Host, change: Change) -> None:
        raise NotImplementedError(f"{self.name} has no live settings")
