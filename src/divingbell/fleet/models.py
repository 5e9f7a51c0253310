"""The store's tables (SQLAlchemy 2 ORM). Times are naive UTC datetimes (see `utcnow`).

Nothing here knows HTTP; the schema itself is created and changed only by the Alembic
migrations in `migrations/versions/`, which must match these classes (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from divingbell.fleet.scheduler import scheduling_class


def utcnow() -> datetime:
    """Naive UTC: compared as-is on both SQLite (text) and PostgreSQL (timestamp)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Token(Base):
    """An operator, bootstrap or boot token: only the SHA-256 of its secret is kept.

    A `boot` token is issued by a network boot (`/v1/ipxe`) and is bound to that boot: the
    `booting` row it created or found (`machine_id`) and the UUID and MAC the request carried
    (`bound_uuid`, `bound_mac`). It enrols at most one machine and is deleted when it does
    (migration 0005)."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(200), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    machine_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    bound_uuid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bound_mac: Mapped[str | None] = mapped_column(String(17), nullable=True)
    # Boot tokens are counted (the cap on pending enrolments) and purged by expiry.
    __table_args__ = (Index("ix_tokens_role_expires", "role", "expires_at"),)


def _scheduling_default(context: DefaultExecutionContext) -> str | None:
    """A Core insert that names no `scheduling`: derived from the row's roles (none: [])."""
    parameters: dict[str, Any] = context.get_current_parameters()  # type: ignore[no-untyped-call]
    return scheduling_class(parameters.get("roles"))


class Machine(Base):
    """A machine. Its facts (interfaces, disks, LLDP) and install output are loaded only when
    used: the hot paths (auth, config, reports) never pay for them."""

    __tablename__ = "machines"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    boot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hostname: Mapped[str] = mapped_column(String(253), default="", index=True)
    hostname_accepted: Mapped[bool] = mapped_column(Boolean, default=False,
                                                    server_default=false())
    """Whether an operator vouched for `hostname` (an operator's bootstrap token, or `fleet
    accept`): only then does it select the document's host overrides (migration 0005)."""
    serial: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    state_changed_at: Mapped[datetime] = mapped_column(DateTime())
    roles: Mapped[list[Any]] = mapped_column(default=list)
    scheduling: Mapped[str | None] = mapped_column(
        String(16), nullable=True, default=_scheduling_default)
    """`scheduler.scheduling_class(roles)`, derived, never set by hand: kept by assigning
    `roles` (ORM) or by the insert default (Core). Indexed with the state, so a scheduling
    pass reads the control plane and the unassigned machines only, whatever the fleet's size
    (migration 0008)."""
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    rack: Mapped[str | None] = mapped_column(String(128), nullable=True)
    interfaces: Mapped[list[Any]] = mapped_column(default=list, deferred=True)
    disks: Mapped[list[Any]] = mapped_column(default=list, deferred=True)
    lldp: Mapped[list[Any]] = mapped_column(default=list, deferred=True)
    reported_bmc: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, deferred=True)
    """Where the machine's discovery said its BMC is (migration 0009): shown, never trusted to
    power anything (that is `BmcRow`, set by an admin)."""
    credential_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    discovered_at: Mapped[datetime] = mapped_column(DateTime())
    last_report_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    last_report_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_report_etag: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_report_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    install_output: Mapped[str | None] = mapped_column(Text, nullable=True, deferred=True)
    enrolled_with: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """How the machine's current enrolment came about: `boot` (an anonymous boot token),
    `operator` (a bootstrap or admin token), None (never enrolled, or decommissioned). A
    `boot` machine whose name no operator accepted is unadmitted, and those are capped
    (migration 0007)."""
    # The order machines are listed and paged in (migration 0004); booting rows purged by age
    # (migration 0005); unadmitted machines counted (0007); the scheduler's candidates (0008).
    __table_args__ = (Index("ix_machines_created", "created_at", "id"),
                      Index("ix_machines_unadmitted", "enrolled_with", "hostname_accepted",
                            "state"),
                      Index("ix_machines_scheduling", "scheduling", "state"))

    @validates("roles")
    def _keep_scheduling(self, _key: str, roles: list[Any] | None) -> list[Any] | None:
        self.scheduling = scheduling_class(roles)
        return roles



class MachineMac(Base):
    """One row per MAC: the primary key makes a MAC on two machines impossible, even when two
    replicas register the two machines at the same instant."""

    __tablename__ = "machine_macs"
    mac: Mapped[str] = mapped_column(String(17), primary_key=True)
    machine_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("machines.id", ondelete="CASCADE"), index=True)


class StateChange(Base):
    __tablename__ = "machine_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("machines.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime())
    __table_args__ = (Index("ix_machine_history_machine", "machine_id", "id"),)


class Report(Base):
    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("machines.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    etag: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    modules: Mapped[dict[str, Any]] = mapped_column(default=dict)
    drift: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    boot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime())
    __table_args__ = (Index("ix_reports_machine", "machine_id", "id"),)


class Revision(Base):
    """A stored document: the exact text an operator pushed, validated when pushed."""

    __tablename__ = "revisions"
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    source_name: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    created_by: Mapped[str] = mapped_column(String(32))


class Setting(Base):
    """Small named values shared by every replica: `active_revision`, and the `scheduler` row
    that a scheduling pass locks so two replicas never schedule at once."""

    __tablename__ = "fleet_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Lease(Base):
    """A named, numbered lease with a holder and an expiry (install grants, maintenance slots).
    Claimed with one conditional UPDATE, so it is atomic on SQLite and PostgreSQL alike."""

    __tablename__ = "leases"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class AuditEvent(Base):
    """What operators did (pushed or activated a revision, pinned roles, decommissioned a
    machine, force-released a slot): who, when, to what. Added by migration 0002."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str] = mapped_column(Text, default="")


class RolloutRow(Base):
    """A rollout of one revision; its decisions are made by `fleet.rollout` (pure) and stored
    here, so every replica sees the same rollout."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision: Mapped[int] = mapped_column(Integer)
    from_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    waves: Mapped[list[Any]] = mapped_column(default=list)
    gate: Mapped[list[Any] | None] = mapped_column(nullable=True)
    failures: Mapped[list[Any]] = mapped_column(default=list)
    rollback: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    started_by: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime())
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class RolloutMember(Base):
    __tablename__ = "rollout_members"
    rollout_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    machine_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    progress: Mapped[str] = mapped_column(String(16))
    previous_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_rollout_members_machine", "machine_id", "rollout_id"),)


class UiSession(Base):
    """A browser session of the web UI: created by logging in with a token, tied to it (a
    revoked token ends its sessions), only the hash of its secret kept."""

    __tablename__ = "ui_sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tokens.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    expires_at: Mapped[datetime] = mapped_column(DateTime())


class BmcRow(Base):
    """A machine's BMC (migration 0006): where it is, how to trust it, its credentials sealed
    with the service's secrets key (power/secrets.py; exports carry the ciphertext only), and
    the last power state it confirmed."""

    __tablename__ = "bmcs"
    machine_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    protocol: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(512))
    verify_tls: Mapped[bool] = mapped_column(Boolean, default=True)
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    sealed_credentials: Mapped[str] = mapped_column(Text)
    power_state: Mapped[str] = mapped_column(String(16), default="unknown")
    power_checked_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    last_request_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    updated_by: Mapped[str] = mapped_column(String(64))


class RebootWatch(Base):
    """A maintenance reboot the fleet watches (migration 0009): the machine's agent renewed its
    slot saying it is rebooting (`started_at`; `heard_at` its last such renewal). Not heard
    from within `health_timeout_seconds` (its served document's
    `maintenance.reboot.health.timeout`), it gets one BMC power cycle (`rescued_at`, set before
    anything is sent, so never twice) and is left for an operator (`fleet/rescue.py`). Removed
    when the agent is back (a renewal not saying rebooting) or releases its slot."""

    __tablename__ = "reboot_watches"
    machine_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime())
    heard_at: Mapped[datetime] = mapped_column(DateTime())
    health_timeout_seconds: Mapped[float] = mapped_column(Float)
    rescued_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    outcome: Mapped[str] = mapped_column(Text, default="")
