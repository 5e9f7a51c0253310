"""The tenant controller: what Toolforge's maintain-kubeusers did, as a reconcile loop.

Each run reads the whole source (YAML or LDAP), then for every tenant ensures, in order:
its namespace (`<prefix><name>`, labels, `RunAsUser`/`RunAsGroup` annotations), ResourceQuota,
LimitRange, a RoleBinding of the tenant ClusterRole to the tenant's user, and a client
certificate delivered in a kubeconfig in the tenant's home (renewed `renew_before_days` before
it expires). A disabled tenant loses its RoleBinding and kubeconfig entries (its namespace and
data stay). A tenant gone from the source loses its namespace, or only its binding with
`removal.keep_namespace`; more removals in one run than `removal.max_per_run` stop all removals
(a misconfigured source must not empty the cluster). One tenant's failure never stops the
others. What happened to each tenant is written to a ConfigMap and counted in metrics.

Objects are created when absent, compared on the fields divingbell owns and replaced with the
resourceVersion read (a concurrent change is a 409 Conflict: read again, retry once). A
namespace divingbell did not create is never taken over.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from divingbell.core.document.problems import load_model
from divingbell.core.errors import DivingbellError
from divingbell.kube import KubeConflict, KubeError, KubeNotFound, Obj, ObjectApi
from divingbell.policy import kubeconfig
from divingbell.policy.credentials import (
    CredentialError,
    KubernetesSigner,
    LocalCaSigner,
    Signer,
    inspect,
    key_pem,
    make_csr,
    new_key,
    utcnow,
)
from divingbell.policy.tenant_sources import LdapSettings, SourceRead, Tenant, TenantSource

log = logging.getLogger("divingbell.tenants")

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "divingbell-tenants"
TENANT_LABEL = "divingbell.io/tenant"
REMOVED_LABEL = "divingbell.io/tenant-removed"
QUOTA_NAME, LIMITS_NAME, BINDING_NAME = "tenant-quota", "tenant-limits", "tenant"

Quantity = str | int | float


# The controller's configuration ------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConf(_Strict):
    name: str = "divingbell"
    server: str = "https://kubernetes.default.svc"
    ca_file: Path | None = None


class CredentialsConf(_Strict):
    signer: Literal["kubernetes", "local-ca"] = "kubernetes"
    ca_cert: Path | None = None
    ca_key: Path | None = None
    validity_days: int = Field(default=365, ge=2, le=3650)
    renew_before_days: int = Field(default=30, ge=1)
    groups: list[str] = Field(default_factory=list)
    csr_timeout_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _ca_for_local(self) -> CredentialsConf:
        if self.signer == "local-ca" and (self.ca_cert is None or self.ca_key is None):
            raise ValueError("signer local-ca needs ca_cert and ca_key")
        if self.renew_before_days >= self.validity_days:
            raise ValueError("renew_before_days must be shorter than validity_days, or every "
                             "run would renew")
        return self


class HomeConf(_Strict):
    pattern: str = "/home/{name}"
    create: bool = False
    # Use the source's home (YAML `home:`, LDAP homeDirectory) when it has one.
    from_source: bool = True

    @model_validator(mode="after")
    def _pattern(self) -> HomeConf:
        if not self.pattern.startswith("/") or "{name}" not in self.pattern:
            raise ValueError("pattern must be an absolute path containing {name}")
        return self


class RemovalConf(_Strict):
    keep_namespace: bool = False
    max_per_run: int = Field(default=10, ge=0)


class StatusConf(_Strict):
    namespace: str = "divingbell-policy"
    configmap: str = "divingbell-tenants"


class TenantOverride(_Strict):
    quota: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, dict[str, Quantity]] = Field(default_factory=dict)


class TenantsConfig(_Strict):
    namespace_prefix: str = "tool-"
    namespace_labels: dict[str, str] = Field(default_factory=lambda: {"tenancy": "tool"})
    cluster_role: str = "divingbell-tenant"
    # The namespace annotations the webhook's uid_enforcer reads (its `annotation` and
    # `group_annotation`).
    uid_annotation: str = "RunAsUser"
    gid_annotation: str = "RunAsGroup"
    quota: dict[str, Quantity] = Field(default_factory=lambda: {  # type: ignore[arg-type]
        "pods": "16", "requests.cpu": "2", "requests.memory": "6Gi", "limits.cpu": "4",
        "limits.memory": "8Gi", "persistentvolumeclaims": "0"})
    limits: dict[str, dict[str, Quantity]] = Field(default_factory=lambda: {  # type: ignore[arg-type]
        "default": {"cpu": "500m", "memory": "512Mi"},
        "defaultRequest": {"cpu": "150m", "memory": "256Mi"},
        "max": {"cpu": "2", "memory": "4Gi"}})
    overrides: dict[str, TenantOverride] = Field(default_factory=dict)
    credentials: CredentialsConf = CredentialsConf()
    cluster: ClusterConf = ClusterConf()
    home: HomeConf = HomeConf()
    removal: RemovalConf = RemovalConf()
    status: StatusConf = StatusConf()
    ldap: LdapSettings = LdapSettings()

    @model_validator(mode="after")
    def _limit_kinds(self) -> TenantsConfig:
        allowed = {"default", "defaultRequest", "max", "min", "maxLimitRequestRatio"}
        for where, limits in [("limits", self.limits),
                              *((f"overrides.{n}.limits", o.limits)
                                for n, o in self.overrides.items())]:
            unknown = set(limits) - allowed
            if unknown:
                raise ValueError(f"{where}: unknown {', '.join(sorted(unknown))}; allowed: "
                                 f"{', '.join(sorted(allowed))}")
        return self


def load_config(path: Path | None) -> TenantsConfig:
    return TenantsConfig() if path is None else load_model(TenantsConfig, path)


# Status and metrics ------------------------------------------------------------------------

ACTIVE, DISABLED, REMOVED, FAILED = "active", "disabled", "removed", "failed"


@dataclass
class TenantStatus:
    name: str
    state: str
    namespace: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    certificate_expires: str | None = None
    messages: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v not in (None, [])}


@dataclass
class RunReport:
    started: float
    seconds: float = 0.0
    source: str = ""
    tenants: list[TenantStatus] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(t.state != FAILED for t in self.tenants)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seconds": round(self.seconds, 3), "ok": self.ok,
                "errors": self.errors, "skipped": self.skipped,
                "tenants": [t.as_dict() for t in self.tenants]}


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.accounts = Counter("divingbell_tenants_accounts", "Tenant account events",
                                ["event"], registry=self.registry)
        for event in ("created", "renewed", "disabled", "removed", "failed"):
            self.accounts.labels(event)
        self.tenants = Gauge("divingbell_tenants", "Tenants by state after the last run",
                             ["state"], registry=self.registry)
        self.run_seconds = Histogram("divingbell_tenants_run_seconds", "Duration of a run",
                                     registry=self.registry,
                                     buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.last_success = Gauge("divingbell_tenants_last_success_timestamp_seconds",
                                  "When a run last finished without errors",
                                  registry=self.registry)


# The controller ----------------------------------------------------------------------------

class TenantError(DivingbellError):
    pass


def _strings(value: Mapping[str, Quantity]) -> dict[str, str]:
    return {k: str(v) for k, v in value.items()}


@dataclass
class Controller:
    api: ObjectApi
    source: TenantSource
    config: TenantsConfig
    signer: Signer
    clock: Callable[[], datetime.datetime] = utcnow
    metrics: Metrics = field(default_factory=Metrics)

    # -- one run --
    def run(self) -> RunReport:
        started = time.monotonic()
        report = RunReport(self.clock().timestamp(), source=self.source.describe())
        try:
            read: SourceRead = self.source.read()
        except DivingbellError as exc:
            report.errors.append(f"cannot read the tenant source: {exc}; nothing was changed")
            return self._finish(report, started, write_status=False)
        report.skipped = read.skipped
        previous = self._previous_status()
        wanted = {t.name for t in read.tenants} | read.held
        for tenant in read.tenants:
            report.tenants.append(self._reconcile(tenant))
        try:
            report.tenants.extend(self._remove_absent(wanted, previous, report))
        except KubeError as exc:
            report.errors.append(f"cannot list tenant namespaces: {exc}")
        kept = {name: previous[name] for name in read.held if name in previous}
        return self._finish(report, started, write_status=True, kept=kept)

    def _finish(self, report: RunReport, started: float, *, write_status: bool,
                kept: Mapping[str, Any] | None = None) -> RunReport:
        report.seconds = time.monotonic() - started
        if write_status:
            try:
                self._write_status(report, kept or {})
            except KubeError as exc:
                report.errors.append(f"cannot write the status ConfigMap: {exc}")
        self.metrics.run_seconds.observe(report.seconds)
        for state in (ACTIVE, DISABLED, FAILED):
            self.metrics.tenants.labels(state).set(
                sum(1 for t in report.tenants if t.state == state))
        if report.ok:
            self.metrics.last_success.set(time.time())
        return report

    # -- one tenant --
    def _reconcile(self, tenant: Tenant) -> TenantStatus:
        namespace = self.config.namespace_prefix + tenant.name
        home = (tenant.home if tenant.home and self.config.home.from_source
                else self.config.home.pattern.format(name=tenant.name))
        status = TenantStatus(tenant.name, DISABLED if tenant.disabled else ACTIVE, namespace,
                              tenant.uid, tenant.gid, home)
        try:
            self._ensure_namespace(tenant, namespace, status)
            self._ensure(self._quota(tenant, namespace), status)
            self._ensure(self._limit_range(tenant, namespace), status)
            if tenant.disabled:
                self._disable(tenant, namespace, status)
            else:
                self._ensure(self._binding(tenant, namespace), status)
                self._ensure_credentials(tenant, namespace, home, status)
        except (KubeError, CredentialError, kubeconfig.HomeError, TenantError) as exc:
            status.state = FAILED
            status.messages.append(str(exc))
            self.metrics.accounts.labels("failed").inc()
            log.warning("tenant %s: %s", tenant.name, exc)
        return status

    def _ensure_namespace(self, tenant: Tenant, name: str, status: TenantStatus) -> None:
        labels = {**self.config.namespace_labels, TENANT_LABEL: tenant.name, MANAGED_BY: MANAGER}
        annotations = {self.config.uid_annotation: str(tenant.uid),
                       self.config.gid_annotation: str(tenant.gid)}
        try:
            current = self.api.get("Namespace", name)
        except KubeNotFound:
            self.api.create({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": name, "labels": labels,
                                          "annotations": annotations}})
            status.actions.append(f"created namespace {name}")
            self.metrics.accounts.labels("created").inc()
            return
        metadata = current.get("metadata") or {}
        have_labels = metadata.get("labels") or {}
        if have_labels.get(MANAGED_BY) != MANAGER or have_labels.get(TENANT_LABEL) not in (
                None, tenant.name):
            raise TenantError(f"namespace {name} exists and was not created by divingbell for "
                              "this tenant; it is left alone (label it "
                              f"{MANAGED_BY}={MANAGER} to hand it over)")
        have_annotations = metadata.get("annotations") or {}
        patch: dict[str, Any] = {}
        label_patch: dict[str, Any] = {k: v for k, v in labels.items()
                                       if have_labels.get(k) != v}
        if REMOVED_LABEL in have_labels:
            label_patch[REMOVED_LABEL] = None
        if label_patch:
            patch["labels"] = label_patch
        annotation_patch = {k: v for k, v in annotations.items()
                            if have_annotations.get(k) != v}
        if annotation_patch:
            patch["annotations"] = annotation_patch
        if patch:
            self.api.merge_patch("Namespace", name, {"metadata": patch})
            status.actions.append(f"updated namespace {name}: {', '.join(sorted(patch))}")

    def _quota(self, tenant: Tenant, namespace: str) -> Obj:
        hard = {**_strings(self.config.quota),
                **_strings(self.config.overrides.get(tenant.name, TenantOverride()).quota),
                **tenant.quota}
        return {"apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": QUOTA_NAME, "namespace": namespace,
                             "labels": {MANAGED_BY: MANAGER}},
                "spec": {"hard": hard}}

    def _limit_range(self, tenant: Tenant, namespace: str) -> Obj:
        override = self.config.overrides.get(tenant.name, TenantOverride()).limits
        item: dict[str, Any] = {"type": "Container"}
        for layer in (self.config.limits, override, tenant.limits):
            for kind, values in layer.items():
                item[kind] = {**item.get(kind, {}), **_strings(values)}
        return {"apiVersion": "v1", "kind": "LimitRange",
                "metadata": {"name": LIMITS_NAME, "namespace": namespace,
                             "labels": {MANAGED_BY: MANAGER}},
                "spec": {"limits": [item]}}

    def _binding(self, tenant: Tenant, namespace: str) -> Obj:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": BINDING_NAME, "namespace": namespace,
                             "labels": {MANAGED_BY: MANAGER}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": self.config.cluster_role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                              "name": tenant.name}]}

    def _ensure(self, desired: Obj, status: TenantStatus) -> None:
        """Create `desired`, or replace it when the fields divingbell owns differ."""
        kind, meta = desired["kind"], desired["metadata"]
        owned = [k for k in desired if k not in ("apiVersion", "kind", "metadata")]
        for attempt in range(2):
            try:
                current = self.api.get(kind, meta["name"], meta["namespace"])
            except KubeNotFound:
                try:
                    self.api.create(desired)
                except KubeConflict:
                    if attempt:
                        raise
                    continue  # someone created it meanwhile: compare with theirs
                status.actions.append(f"created {kind} {meta['name']}")
                return
            if all(current.get(k) == desired[k] for k in owned) and all(
                    (current["metadata"].get("labels") or {}).get(k) == v
                    for k, v in meta["labels"].items()):
                return
            if kind == "RoleBinding" and current.get("roleRef") != desired["roleRef"]:
                self.api.delete(kind, meta["name"], meta["namespace"])  # roleRef is immutable
                self.api.create(desired)
                status.actions.append(f"recreated {kind} {meta['name']} (new role)")
                return
            body = {**desired, "metadata": {
                **meta, "resourceVersion": current["metadata"]["resourceVersion"]}}
            try:
                self.api.replace(body)
            except KubeConflict:
                if attempt:
                    raise
                continue  # changed since we read it: read again
            status.actions.append(f"updated {kind} {meta['name']}")
            return
        raise TenantError(f"{kind} {meta['name']} kept changing under us; retrying next run")

    # -- credentials --
    def _entries(self, tenant_name: str, namespace: str) -> kubeconfig.Entries:
        cluster = self.config.cluster.name
        return kubeconfig.Entries(cluster=cluster, user=f"{tenant_name}@{cluster}",
                                  context=f"{tenant_name}@{cluster}", namespace=namespace)

    def _ensure_credentials(self, tenant: Tenant, namespace: str, home: str,
                            status: TenantStatus) -> None:
        entries = self._entries(tenant.name, namespace)
        existing = kubeconfig.read(home, tenant.uid)
        create_home = False
        if existing.problem is not None:
            if not (self.config.home.create and existing.problem == f"{home} does not exist"):
                raise kubeconfig.HomeError(existing.problem)
            create_home = True
        user = kubeconfig.user_entry(existing.data, entries)
        renew_at = datetime.timedelta(days=self.config.credentials.renew_before_days)
        current = None
        if user.get("client-certificate-data") and user.get("client-key-data"):
            try:
                current = inspect(base64.b64decode(user["client-certificate-data"]),
                                  base64.b64decode(user["client-key-data"]))
            except ValueError:
                current = None
        now = self.clock()
        if (current is not None and current.matches_key and current.common_name == tenant.name
                and current.not_after - renew_at > now
                and self._cluster_entry_current(existing.data, entries)):
            status.certificate_expires = current.not_after.isoformat()
            return
        key = new_key()
        cert = self.signer.sign(tenant.name, make_csr(key, tenant.name,
                                                      self.config.credentials.groups))
        info = inspect(cert, key_pem(key))
        if info is None or not info.matches_key:
            raise CredentialError("the signer returned a certificate that does not match the "
                                  "key; not delivered")
        data = kubeconfig.merged(existing.data, entries, self._cluster_entry(), {
            "client-certificate-data": base64.b64encode(cert).decode(),
            "client-key-data": base64.b64encode(key_pem(key)).decode()})
        kubeconfig.write(home, tenant.uid, tenant.gid, data, create_home=create_home)
        status.certificate_expires = info.not_after.isoformat()
        renewed = current is not None and current.common_name == tenant.name
        status.actions.append(("renewed" if renewed else "issued") + " client certificate, "
                              f"valid until {info.not_after:%Y-%m-%d}")
        if renewed:
            self.metrics.accounts.labels("renewed").inc()

    def _cluster_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"server": self.config.cluster.server}
        if self.config.cluster.ca_file is not None:
            try:
                entry["certificate-authority-data"] = base64.b64encode(
                    self.config.cluster.ca_file.read_bytes()).decode()
            except OSError as exc:
                raise CredentialError(f"cannot read cluster.ca_file: {exc.strerror}") from None
        return entry

    def _cluster_entry_current(self, data: Mapping[str, Any] | None,
                               entries: kubeconfig.Entries) -> bool:
        for item in (data or {}).get("clusters") or []:
            if item.get("name") == entries.cluster:
                return bool(item.get("cluster") == self._cluster_entry())
        return False

    def _disable(self, tenant: Tenant, namespace: str, status: TenantStatus) -> None:
        if self._delete_if_present("RoleBinding", BINDING_NAME, namespace):
            status.actions.append("removed RoleBinding")
            self.metrics.accounts.labels("disabled").inc()
        home = status.home or ""
        if kubeconfig.remove(home, tenant.uid, tenant.gid,
                             self._entries(tenant.name, namespace)):
            status.actions.append("removed kubeconfig credentials")

    def _delete_if_present(self, kind: str, name: str, namespace: str) -> bool:
        """Read first: a disabled tenant is looked at every run, and a GET is cheaper for
        the API server (and its audit log) than a DELETE that finds nothing."""
        try:
            self.api.get(kind, name, namespace)
            self.api.delete(kind, name, namespace)
        except KubeNotFound:
            return False
        return True

    # -- tenants gone from the source --
    def _remove_absent(self, wanted: set[str], previous: Mapping[str, Any],
                       report: RunReport) -> list[TenantStatus]:
        namespaces = self.api.list("Namespace", labels={MANAGED_BY: MANAGER})
        gone = []
        for ns in namespaces:
            labels = (ns.get("metadata") or {}).get("labels") or {}
            name = labels.get(TENANT_LABEL)
            if name and name not in wanted and REMOVED_LABEL not in labels:
                gone.append((name, ns["metadata"]["name"]))
        limit = self.config.removal.max_per_run
        if len(gone) > limit:
            report.errors.append(
                f"{len(gone)} tenants are gone from the source, more than removal.max_per_run="
                f"{limit}: none were removed. Check the source; raise the limit if this is "
                "intended")
            return []
        removed = []
        for name, namespace in sorted(gone):
            status = TenantStatus(name, REMOVED, namespace)
            known = previous.get(name) or {}
            try:
                if self.config.removal.keep_namespace:
                    self._delete_if_present("RoleBinding", BINDING_NAME, namespace)
                    self.api.merge_patch("Namespace", namespace,
                                         {"metadata": {"labels": {REMOVED_LABEL: "true"}}})
                    status.actions.append("removed RoleBinding; namespace kept")
                else:
                    self.api.delete("Namespace", namespace)
                    status.actions.append("deleted namespace")
                if isinstance(known.get("home"), str) and isinstance(known.get("uid"), int):
                    uid = known["uid"]
                    gid = known["gid"] if isinstance(known.get("gid"), int) else uid
                    if kubeconfig.remove(known["home"], uid, gid,
                                         self._entries(name, namespace)):
                        status.actions.append("removed kubeconfig credentials")
                self.metrics.accounts.labels("removed").inc()
            except (KubeError, kubeconfig.HomeError) as exc:
                status.state = FAILED
                status.messages.append(str(exc))
            removed.append(status)
        return removed

    # -- the status ConfigMap --
    def _previous_status(self) -> dict[str, Any]:
        try:
            current = self.api.get("ConfigMap", self.config.status.configmap,
                                   self.config.status.namespace)
        except KubeError:
            return {}
        out = {}
        for name, text in (current.get("data") or {}).items():
            try:
                out[name] = json.loads(text)
            except ValueError:
                continue
        return out

    def _write_status(self, report: RunReport, kept: Mapping[str, Any]) -> None:
        """One key per tenant; held-back tenants keep their last entry (the home and uid a
        later removal needs), marked held."""
        stamp = datetime.datetime.fromtimestamp(report.started, datetime.UTC).isoformat()
        data = {name: json.dumps({**entry, "held": True}, sort_keys=True)
                for name, entry in kept.items()}
        data.update({t.name: json.dumps({**t.as_dict(), "updated": stamp}, sort_keys=True)
                     for t in report.tenants if t.state != REMOVED or t.messages})
        desired = {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": self.config.status.configmap,
                                "namespace": self.config.status.namespace,
                                "labels": {MANAGED_BY: MANAGER}},
                   "data": data}
        self._ensure(desired, TenantStatus("", "", ""))


def make_signer(config: TenantsConfig, api: ObjectApi,
                clock: Callable[[], datetime.datetime] = utcnow) -> Signer:
    creds = config.credentials
    if creds.signer == "local-ca":
        assert creds.ca_cert is not None and creds.ca_key is not None
        return LocalCaSigner.from_files(creds.ca_cert, creds.ca_key, creds.groups,
                                        creds.validity_days, clock)
    return KubernetesSigner(api, datetime.timedelta(days=creds.validity_days),
                            creds.csr_timeout_seconds, clock)
