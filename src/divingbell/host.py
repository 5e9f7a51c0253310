"""The host: the one place that runs commands and touches files on a (possibly chrooted) root.

Every path a module names is a path *on the host* ("/etc/sysctl.d/x.conf"); `Host.path` maps it
under the root divingbell works on. Every command goes through `Host.run`: an argv list (never a
shell string), stdin closed, a fixed environment so output parses the same everywhere, and the
captured output carried into the error when it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from divingbell.errors import CommandError

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "LANG": "C",
}


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Host:
    """A host root filesystem plus the kernel interfaces divingbell reads and writes.

    root: the host's "/" (a pod mounts it at /host). Commands run chrooted into it unless it is "/".
    proc_sys: where kernel tunables live. Always the running kernel's /proc/sys in production
    (sysctls belong to the kernel, not to a root filesystem); tests point it at a scratch tree.
    """

    root: Path = Path("/")
    proc_sys: Path = Path("/proc/sys")
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def chrooted(self) -> bool:
        return self.root.resolve() != Path("/")

    def path(self, host_path: str | PurePosixPath) -> Path:
        """Map an absolute path on the host to this process's view of it under `root`.

        `Path("/host") / "/etc"` is "/etc", a classic trap: the leading slash is stripped.
        """
        text = str(host_path)
        if not text.startswith("/"):
            raise ValueError(f"host paths are absolute, got {text!r}")
        return self.root / text.lstrip("/")

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        ok_codes: Sequence[int] = (0,),
        input_text: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed:
        """Run a command on the host (chrooted into `root` when it is not "/")."""
        full = ["chroot", str(self.root), *argv] if self.chrooted else list(argv)
        run_env = {**CLEAN_ENV, **self.extra_env, **(env or {})}
        try:
            proc = subprocess.run(  # noqa: PLW1510 - the check below is ours, with stderr in the error
                full,
                input=input_text,
                stdin=None if input_text is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=run_env,
                timeout=timeout,
            )
        except FileNotFoundError:
            raise CommandError(list(argv), 127, "", "") from None
        except subprocess.TimeoutExpired as exc:
            raise CommandError(list(argv), -9, "", f"timed out after {timeout}s") from exc
        done = Completed(list(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode not in ok_codes:
            raise CommandError(list(argv), proc.returncode, proc.stdout, proc.stderr)
        return done

    def run_script(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        timeout: float,
        grace: float = 10.0,
        cwd: str | None = None,
    ) -> Completed:
        """Run an operator's script in its own process group and return however it ended.

        On timeout the whole group gets SIGTERM, then SIGKILL after `grace` seconds: a script's
        children (`sleep`, a daemon it forked by mistake) die with it. A non-zero exit is a
        result here, not an error.
        """
        full = ["chroot", str(self.root), *argv] if self.chrooted else list(argv)
        if cwd is not None and self.chrooted:  # chroot(8) starts in the new "/"
            full = ["chroot", str(self.root), "env", f"--chdir={cwd}", *argv]
        started = time.monotonic()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**CLEAN_ENV, **self.extra_env, **env},
                                cwd=None if cwd is None or self.chrooted else self.path(cwd))
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
        # Stragglers that ignored TERM while the leader exited still share the group.
        if timed_out:
            _signal_group(proc.pid, signal.SIGKILL)
        return Completed(list(argv), proc.returncode, stdout, stderr, timed_out,
                         time.monotonic() - started)

    # Files -----------------------------------------------------------------------------------

    def read_text(self, host_path: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            return self.path(host_path).read_text()
        except FileNotFoundError:
            return None

    def write_atomic(
        self,
        host_path: str,
        content: str | bytes,
        mode: int = 0o644,
        owner: tuple[int, int] | None = None,
        dir_mode: int | None = None,
        durable: bool = True,
    ) -> None:
        """Write a file so readers see the old or the new content, never a torn one.

        Temp file in the same directory, fsync, rename, fsync the directory. `owner` (uid, gid)
        owns the file and, with `dir_mode`, its directory when that has to be created.
        `durable=False` skips the fsyncs, for reports that the next run rewrites anyway.
        """
        target = self.path(host_path)
        if not target.parent.exists():
            target.parent.mkdir(parents=True)
            if dir_mode is not None:
                target.parent.chmod(dir_mode)
            if owner is not None:
                os.chown(target.parent, *owner)
        data = content.encode() if isinstance(content, str) else content
        fd, tmp = _create_temp(target)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            fsync_dir(target.parent)

    def remove(self, host_path: str) -> bool:
        """Remove a file; False when it was already gone."""
        target = self.path(host_path)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        return True


    def lstat(self, host_path: str) -> os.stat_result | None:
        try:
            return self.path(host_path).lstat()
        except FileNotFoundError:
            return None

    def set_owner_mode(self, host_path: str, uid: int, gid: int, mode: int) -> None:
        """chown and chmod without following a symlink out of the root."""
        target = self.path(host_path)
        os.chown(target, uid, gid, follow_symlinks=False)
        if not target.is_symlink():
            os.chmod(target, mode)

    def symlink(self, link_target: str, host_path: str) -> None:
        """Create (or replace) a symlink at `host_path` pointing to `link_target` as written."""
        link = self.path(host_path)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) == link_target:
            return
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(link_target)

    def user_ids(self, user: str) -> tuple[int, int]:
        """uid and gid of a user in the host's own /etc/passwd (not this process's NSS)."""
        for line in (self.read_text("/etc/passwd") or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(f"no user {user!r} in {self.path('/etc/passwd')}")

    def is_systemd_running(self) -> bool:
        """Whether systemd is PID 1 of the host (sd_booted(3): /run/systemd/system exists)."""
        return self.path("/run/systemd/system").is_dir()


def _create_temp(target: Path) -> tuple[int, str]:
    """A new 0600 file next to `target` (what tempfile.mkstemp does, without importing
    tempfile and its dependencies into every run)."""
    for attempt in range(1000):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{attempt}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(tmp, flags, 0o600), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {target}")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
