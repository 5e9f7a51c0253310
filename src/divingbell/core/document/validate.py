"""Validate a loaded document whole, and resolve it for one node.

Every problem is reported with its path in the document and, where known, file:line; unknown
keys suggest the closest valid name. Each override is validated as it will be used: merged over
the base conf of its module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from divingbell.core.document.loader import Loaded
from divingbell.core.document.nodeconfig import Applied
from divingbell.core.document.nodeconfig import NodeConfig as NodeConfig  # noqa: PLC0414
from divingbell.core.document.overrides import merge_module, select_override
from divingbell.core.document.paths import PathKey
from divingbell.core.document.problems import check_model, closest, problem_at, problems_from
from divingbell.core.document.schema import SECTION_MODELS, Document
from divingbell.core.document.types import strings_with_nul
from divingbell.core.errors import DocumentError, Problem


@dataclass(frozen=True)
class ValidDocument:
    loaded: Loaded
    model: Document
    notes: list[str] = field(default_factory=list)

    @property
    def raw_conf(self) -> Mapping[str, Any]:
        conf = self.loaded.data.get("conf") or {}
        return conf if isinstance(conf, Mapping) else {}


# Top-level keys of Divingbell's Helm chart values that configure the chart, not the node
# (openstack-helm conventions): a chart values file loads unchanged and they are ignored.
CHART_KEYS = frozenset({
    "images", "pod", "labels", "manifests", "network_policy", "dependencies", "endpoints",
    "release_group", "secrets", "release_uuid", "helm3_hook", "annotations", "jobs",
    "monitoring", "tls",
})
# Settings under `conf:` that only the chart's shell scripts read.
CHART_CONF_KEYS = ("chroot_mnt_path", "log_colors", "extra_verbose")


def _without_chart_keys(loaded: Loaded) -> tuple[dict[str, Any], list[str]]:
    """The document minus chart-only keys and overrides for things that are not modules, and
    the notes that say what was ignored. Everything else is validated strictly."""
    data = {k: v for k, v in loaded.data.items() if k not in CHART_KEYS}
    ignored = sorted(k for k in loaded.data if k in CHART_KEYS)
    notes: list[str] = []
    conf = data.get("conf")
    if isinstance(conf, Mapping):
        ignored += [f"conf.{k}" for k in CHART_CONF_KEYS if k in conf]
        overrides = conf.get("overrides")
        if isinstance(overrides, Mapping):
            known = [f"divingbell_{m}" for m in SECTION_MODELS]
            for key in overrides:
                if key in known:
                    continue
                where = loaded.location(("conf", "overrides", str(key)))
                close = closest(str(key).removeprefix("divingbell_"), list(SECTION_MODELS))
                hint = f"divingbell_{close}" if close else None
                notes.append(
                    f"conf.overrides.{key} does not override a divingbell module; ignored"
                    + (f" (did you mean {hint}?)" if hint else
                       f" (modules: {', '.join(known)})")
                    + (f" ({where})" if where else ""))
            data["conf"] = {**conf, "overrides": {k: v for k, v in overrides.items()
                                                   if k in known}}
    if ignored:
        notes.insert(0, "ignored Divingbell chart settings that mean nothing to divingbell on "
                        f"a node: {', '.join(ignored)}")
    return data, notes


NO_CONF = "the document has no `conf:`"
"""How the problem of a document without `conf:` begins: an agent tells it apart (it is
evidently not a whole document) from other invalid ones."""


def is_missing_conf(error: DocumentError) -> bool:
    """The document has no `conf:` at all (an empty file, or one cut before it)."""
    return any(p.path == "conf" and p.message.startswith(NO_CONF) for p in error.problems)


def validate(loaded: Loaded, *, allow_empty: bool = False) -> ValidDocument:
    """`allow_empty`: a document without `conf:` (an empty file) means "nothing on this node"
    instead of an error; removing everything must be asked for."""
    problems = [problem_at(loaded, path, "must not contain a NUL character")
                for path in strings_with_nul(loaded.data)]
    if "conf" not in loaded.data and not allow_empty:
        where = loaded.sources[0] if loaded.sources else None
        problems.append(Problem(
            "conf", NO_CONF + " (an empty or truncated file?). divingbell "
            "never takes a missing document to mean \"remove everything\": write `conf: {}` "
            "or run `divingbell apply --allow-empty` if that is what you want", where))
    # Not raised yet: a misspelt `conf` is also named by the schema check ("did you mean").
    data, notes = _without_chart_keys(loaded)
    model, schema_problems = check_model(Document, data, loaded)
    problems += schema_problems
    raw_conf = data.get("conf") if isinstance(data.get("conf"), Mapping) else {}
    overrides = (raw_conf or {}).get("overrides")
    if isinstance(overrides, Mapping):
        for module in SECTION_MODELS:
            problems.extend(_check_module_overrides(loaded, raw_conf or {}, module))
    if problems:
        raise DocumentError(list(dict.fromkeys(problems)))
    assert model is not None
    if "allow_mass_removal" in data:
        where = loaded.location(("allow_mass_removal",))
        notes.append("allow_mass_removal no longer does anything and can be removed: "
                     "`divingbell apply` does what the document says, an agent refuses only "
                     "a document that is evidently not whole, and a fleet revision that "
                     "removes more than it keeps is pushed with `--allow-removals`"
                     + (f" ({where})" if where else ""))
    return ValidDocument(Loaded(data, loaded.marks, loaded.sources), model, notes)


def resolve(document: ValidDocument, node: str, labels: Mapping[str, str]) -> NodeConfig:
    """The effective configuration for `node` with `labels`."""
    raw_conf = document.raw_conf
    overrides = raw_conf.get("overrides") or {}
    modules: dict[str, BaseModel] = {}
    applied: dict[str, Applied] = {}
    for module in SECTION_MODELS:
        base = raw_conf.get(module)
        chosen = select_override(overrides.get(f"divingbell_{module}") or {}, node, labels, module)
        if chosen is not None:
            applied[module] = chosen[0]
            override_conf = chosen[1].get(module)
            if override_conf is not None:
                base = merge_module(module, base if base is not None else {}, override_conf)
        if base is None:
            continue
        # Validated already (base and every override merged); this cannot fail for a valid doc.
        modules[module] = SECTION_MODELS[module].model_validate(base)
    return NodeConfig(node, dict(labels), modules, applied)


def _check_module_overrides(
    loaded: Loaded, raw_conf: Mapping[str, Any], module: str
) -> list[Problem]:
    section = (raw_conf.get("overrides") or {}).get(f"divingbell_{module}")
    if not isinstance(section, Mapping):
        return []
    problems: list[Problem] = []
    entries: list[tuple[PathKey, Mapping[str, Any]]] = []
    for kind in ("hosts", "labels"):
        listed = section.get(kind)
        for index, entry in enumerate(listed if isinstance(listed, list) else []):
            conf = entry.get("conf") if isinstance(entry, Mapping) else None
            if isinstance(conf, Mapping):
                path: PathKey = ("conf", "overrides", f"divingbell_{module}", kind, index, "conf")
                entries.append((path, conf))
    base_errors = _error_locs(SECTION_MODELS[module], raw_conf.get(module) or {})
    for path, conf in entries:
        for key in conf:
            if key != module:
                hint = (
                    f"; put it under conf.overrides.divingbell_{key}"
                    if key in SECTION_MODELS else ""
                )
                problems.append(problem_at(
                    loaded, (*path, key),
                    f"an override of divingbell_{module} may only set `{module}`{hint}"))
        if module not in conf:
            continue
        merged = merge_module(module, raw_conf.get(module) or {}, conf[module])
        try:
            SECTION_MODELS[module].model_validate(merged)
        except ValidationError as exc:
            # A problem the base conf has on its own is reported once, at the base.
            own = [
                error for error in exc.errors(include_url=False)
                if (error["loc"], error["msg"]) not in base_errors
            ]
            problems.extend(problems_from(own, SECTION_MODELS[module], loaded, (*path, module)))
    return problems


def _error_locs(model: type[BaseModel], value: Any) -> set[tuple[tuple[Any, ...], str]]:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        return {(error["loc"], error["msg"]) for error in exc.errors(include_url=False)}
    return set()
