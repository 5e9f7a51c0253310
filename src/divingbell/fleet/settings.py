"""The service's settings: one frozen value built by `divingbell serve` (or a test)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DB_URL = "sqlite:////var/lib/divingbell/fleet.db"


@dataclass(frozen=True)
class FleetSettings:
    db_url: str = DEFAULT_DB_URL
    control_plane_size: int = 3
    install_parallel: int = 2
    """At most this many machines hold an install grant at once."""
    install_ttl_seconds: float = 1800.0
    """A grant not ended by a result within this time expires (the machine died mid-install)."""
    reports_kept: int = 20
    """Reports kept per machine; older ones are deleted as new ones arrive."""
    loop_connections: int = 4
    """PostgreSQL: connections each process's event loop keeps for machines' own polls and
    reports (fleet/pgloop.py), besides its pool; 0: they all go to the store threads."""
    migrate_at_start: bool = True
    # Bootstrap (fleet/api/bootstrap.py): where join scripts come from, and the cluster's API.
    bootstrap_design: tuple[str, ...] = ()
    """Design files join scripts are built from (as for `divingbell bootstrap build`)."""
    bootstrap_pki: str | None = None
    """The `divingbell pki generate` directory: the CA and the nodes' certificates."""
    kubeconfig: str | None = None
    """Credentials for the cluster's API server (node labels); default: in-cluster or ~/.kube."""
    kube_server: str | None = None
    """An unauthenticated API server URL instead (kubectl proxy, tests)."""
    assets_dir: str | None = None
    """Served under /v1/assets/ (the discovery image: vmlinuz, initrd.img; install hooks)."""
    public_url: str | None = None
    """The URL machines reach the service at, for boot scripts; default: the request's."""
    boot_profiles: str | None = None
    """A YAML file of boot profiles (fleet/boot.py BootProfiles); default: the discovery image."""
    boot_token_ttl_seconds: float = 900.0
    """Lifetime of the boot token a network boot carries (it can only enrol that machine,
    once); also how long a `booting` row that never enrolled is kept."""
    max_pending_boots: int = 1000
    """At most this many boot tokens are pending (issued, unused, unexpired); a boot request
    that needs another is answered 429, and iPXE retries. Bounds what anonymous boot requests
    can add to the store."""
    max_unadmitted: int = 1000
    """At most this many machines enrolled anonymously (boot token) that no operator admitted
    (accepted their host names) exist; beyond it new anonymous enrolments get 429
    (fleet/admission.py). Bounds what spent boot tokens can add to the store."""
    boot_history_kept: int = 10
    """Boot requests kept in each machine's history (its state changes are all kept)."""
    slot_concurrency: int = 1
    """Maintenance slots per group when the claimer is served no document (with one, its
    `maintenance.reboot.concurrency` decides): never the claimer's own number."""
    slot_ttl_max_seconds: float = 4 * 3600.0
    """A slot claim or renewal asking for longer gets this (a holder renews while it works)."""
    # Out-of-band power (fleet/power.py, power/).
    secrets_key_file: str | None = None
    """The key BMC credentials are sealed with; default: beside an SQLite store (generated)."""
    power_min_interval_seconds: float = 1.0
    """Requests to one BMC are at least this far apart (IPMI BMCs freeze after a burst)."""
    power_timeout_seconds: float = 120.0
    """A power change not confirmed by the BMC within this time is reported as failed."""
    power_confirm_reads: int = 2
    """Identical reads in a row that confirm a power state."""
    bmc_request_timeout_seconds: float = 10.0
    reboot_rescue_interval_seconds: float = 30.0
    """How often the service looks for maintenance reboots not back within their health
    timeout (each gets one BMC power cycle: fleet/rescue.py); 0: never."""

    def __post_init__(self) -> None:
        if self.control_plane_size not in (1, 3, 5, 7):
            raise ValueError("control_plane_size must be an odd quorum: 1, 3, 5 or 7")
        if self.install_parallel < 1:
            raise ValueError("install_parallel must be at least 1")
        if not 1 <= self.slot_concurrency <= 1000:
            raise ValueError("slot_concurrency must be between 1 and 1000")
        if self.slot_ttl_max_seconds <= 0:
            raise ValueError("slot_ttl_max_seconds must be positive")
        if self.max_pending_boots < 1:
            raise ValueError("max_pending_boots must be at least 1")
        if self.max_unadmitted < 1:
            raise ValueError("max_unadmitted must be at least 1")
        if self.power_min_interval_seconds < 0 or self.power_timeout_seconds <= 0:
            raise ValueError("power intervals and timeouts must be positive")
        if self.reboot_rescue_interval_seconds < 0:
            raise ValueError("reboot_rescue_interval_seconds must be 0 (off) or positive")
