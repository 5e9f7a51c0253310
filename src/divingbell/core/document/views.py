"""Derived views of validated configuration, shared by the schema's pydantic models and the
light objects a cached document is rebuilt as (`document.frozen`): plain Python, no pydantic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


class AptConfViews:
    if TYPE_CHECKING:
        packages: Any

    @property
    def all_packages(self) -> list[Any]:
        if isinstance(self.packages, dict):
            return [pkg for group in self.packages.values() for pkg in group]
        return list(self.packages)


class RepositoryViews:
    if TYPE_CHECKING:
        distributions: list[str]
        subrepos: list[str]

    @property
    def suites(self) -> list[str]:
        """The distributions, then `<distribution>-<subrepo>` for each of Divingbell's
        `subrepos` (`bookworm` + `[updates]` -> `bookworm bookworm-updates`)."""
        return [*self.distributions,
                *(f"{dist}-{sub}" for dist in self.distributions for sub in self.subrepos)]


class EthtoolInterfaceViews:
    if TYPE_CHECKING:
        __pydantic_extra__: dict[str, Any] | None

    @property
    def features(self) -> dict[str, bool]:
        """Offload features by name: every key that is not ring/channels/coalesce."""
        return dict(self.__pydantic_extra__ or {})
