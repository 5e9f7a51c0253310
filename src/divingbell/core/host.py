"""The host: the one place that runs commands and touches files on a (possibly chrooted) root.

Every path a module names is a path *on the host* ("/etc/sysctl.d/x.conf"); `Host.path` maps it
under the root divingbell works on. Every command goes through `Host.run`: an argv list (never a
shell string), stdin closed, a fixed environment so output parses the same everywhere, and the
captured output carried into the error when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from divingbell.core import safepath
from divingbell.core.errors import CommandError, UnsafePath

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "LANG": "C",
}


@dataclass(frozen=True)
class Completed:
    """How a command ended: its output, exit code and, for scripts, timing."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0
    interrupted: bool = False


HARD_LINKED = ("has more than one hard link; changing its owner or mode would change every "
               "name it has (a user can link /etc/shadow into their home where "
               "fs.protected_hardlinks is off): name a file with a single link")


def hard_linked(info: os.stat_result) -> bool:
    """A non-directory with more than one name (as systemd-tmpfiles, CVE-2017-18078)."""
    return not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1


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
        import subprocess  # here, not at the top: a no-op apply of sysctls runs no command

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
        import subprocess

        full = ["chroot", str(self.root), *argv] if self.chrooted else list(argv)
        if cwd is not None and self.chrooted:  # chroot(8) starts in the new "/"
            full = ["chroot", str(self.root), "env", f"--chdir={cwd}", *argv]
        started = time.monotonic()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**CLEAN_ENV, **self.extra_env, **env},
                                cwd=None if cwd is None or self.chrooted else self.path(cwd))
        timed_out = interrupted = False
        deadline = started + timeout
        while True:
            try:
                # Short waits, so a SIGTERM/SIGINT to divingbell reaches the script's group
                # (it has its own session: a terminal's Ctrl-C does not).
                stdout, stderr = proc.communicate(
                    timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if interrupt.is_set():
                    interrupted = True
                elif time.monotonic() < deadline:
                    continue
                else:
                    timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            break
        # Stragglers that ignored TERM while the leader exited still share the group.
        if timed_out or interrupted:
            _signal_group(proc.pid, signal.SIGKILL)
        return Completed(list(argv), proc.returncode, stdout, stderr, timed_out,
                         time.monotonic() - started, interrupted)

    # Files -----------------------------------------------------------------------------------
    #
    # Every file operation resolves its path inside `root`, component by component, and acts
    # through the directory descriptor it ends on (see `safepath`): `..` and absolute symlinks
    # stay inside the root as they would for the host itself, and nothing can lead outside it.
    # Directories a user controls (a home, ~/.ssh) are opened with `user_dir`: no symlink is
    # followed there, and each must belong to root or that user and be writable by no one else.

    def open_root(self) -> int:
        return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, host_path: str, flags: int, mode: int = 0, *, follow: bool = True,
              no_symlinks: bool = False, root_links_only: bool = False) -> int:
        root_fd = self.open_root()
        try:
            return safepath.open_in_root(root_fd, _relative(host_path), flags, mode,
                                         follow=follow, no_symlinks=no_symlinks,
                                         root_links_only=root_links_only, shown=host_path)
        finally:
            os.close(root_fd)

    @contextlib.contextmanager
    def _parent(self, host_path: str, *, create: bool = False, dir_mode: int | None = None,
                owner: tuple[int, int] | None = None, user_dir: UserDir | None = None,
                created: list[str] | None = None) -> Iterator[tuple[int, str]]:
        """The directory holding `host_path`, open, and the file's name in it."""
        parent, name = _split(host_path)
        if user_dir is not None:
            fd = self._open_user_dir(parent, user_dir, create=create, created=created)
        else:
            try:
                fd = self._open(parent, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                if not create:
                    raise
                self.makedirs(parent, dir_mode, owner, created=created)
                fd = self._open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _open_user_dir(self, directory: str, user_dir: UserDir, *, create: bool,
                       created: list[str] | None) -> int:
        """Open `directory` (at or below the user's own directory) as sshd's StrictModes
        would trust it: no symlinks from the user's directory down, every directory owned by
        root or the user and writable by no one else."""
        home = user_dir.path.rstrip("/") or "/"
        if directory != home and not directory.startswith(home + "/"):
            raise ValueError(f"{directory} is not under {home}")
        home_parent, home_name = _split(home)
        fd = self._open(home_parent, os.O_RDONLY | os.O_DIRECTORY)
        current = home_parent.rstrip("/")
        try:
            for part in [home_name, *directory[len(home):].strip("/").split("/")]:
                if not part:
                    continue
                current = f"{current}/{part}"
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create or current == home:
                        raise
                    os.mkdir(part, 0o700, dir_fd=fd)
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=fd)
                    os.fchown(child, user_dir.uid, user_dir.gid)
                    os.fchmod(child, 0o700)
                    if created is not None:
                        created.append(current)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(current, "is a symlink or not a directory; a "
                                         "user's own directories are never followed") from None
                    raise
                os.close(fd)
                fd = child
                _check_strict(fd, current, user_dir)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, host_path: str, *, user_dir: UserDir | None = None) -> bytes | None:
        """The file's bytes, or None when it (or its directory) does not exist."""
        try:
            if user_dir is not None:
                with self._parent(host_path, user_dir=user_dir) as (parent, name):
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                 | os.O_NONBLOCK, dir_fd=parent)
            else:
                fd = self._open(host_path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except UnsafePath:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(host_path, "is a symlink in a directory its user controls"
                                 ) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath(host_path, "is not a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_text(self, host_path: str, *, user_dir: UserDir | None = None) -> str | None:
        """The file's text, or None when it does not exist."""
        data = self.read_bytes(host_path, user_dir=user_dir)
        return None if data is None else data.decode(errors="surrogateescape")

    def exists(self, host_path: str) -> bool:
        return self.lstat(host_path, follow=True) is not None

    def is_dir(self, host_path: str) -> bool:
        info = self.lstat(host_path, follow=True)
        return info is not None and stat.S_ISDIR(info.st_mode)

    def lstat(self, host_path: str, *, follow: bool = False, root_links_only: bool = False
              ) -> os.stat_result | None:
        """stat of the path inside the root (of a final symlink itself unless `follow`)."""
        try:
            fd = self._open(host_path, os.O_PATH, follow=follow, root_links_only=root_links_only)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def listdir(self, host_path: str) -> list[str]:
        """Names in a directory (empty when it does not exist)."""
        try:
            fd = self._open(host_path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # absent, not a directory, a symlink loop: nothing to list
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def glob(self, pattern: str) -> list[str]:
        """Host paths matching a glob, found inside the root (hidden names only when the
        pattern names them with a leading dot, as glob(3))."""
        found = [""]
        for part in [p for p in pattern.split("/") if p]:
            nxt = []
            for base in found:
                if part in (".", ".."):
                    continue
                if not _has_magic(part):
                    candidate = f"{base}/{part}"
                    try:
                        if self.lstat(candidate) is not None:
                            nxt.append(candidate)
                    except OSError:  # a loop, a permission: matches nothing, as glob(3)
                        pass
                    continue
                for name in self.listdir(base or "/"):
                    if name.startswith(".") and not part.startswith("."):
                        continue
                    if fnmatch.fnmatchcase(name, part):
                        nxt.append(f"{base}/{name}")
            found = nxt
        return sorted(path for path in found if path)

    def makedirs(self, host_dir: str, mode: int | None = None,
                 owner: tuple[int, int] | None = None, *,
                 created: list[str] | None = None) -> None:
        """Create `host_dir` and missing parents inside the root; note each one created."""
        parts = [p for p in host_dir.split("/") if p]
        for index in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:index])
            try:
                fd = self._open(prefix, os.O_PATH | os.O_DIRECTORY)
                os.close(fd)
                continue
            except FileNotFoundError:
                pass
            parent_fd = self._open("/" + "/".join(parts[: index - 1]),
                                   os.O_RDONLY | os.O_DIRECTORY)
            try:
                try:
                    os.mkdir(parts[index - 1], 0o755 if mode is None else mode,
                             dir_fd=parent_fd)
                except FileExistsError:
                    raise UnsafePath(prefix, "is not a directory that can be used (a symlink "
                                     "to a path missing inside the root?)") from None
                child = os.open(parts[index - 1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=parent_fd)
                try:
                    if mode is not None:
                        os.fchmod(child, mode)
                    if owner is not None:
                        os.fchown(child, *owner)
                finally:
                    os.close(child)
                if created is not None:
                    created.append(prefix)
                fsync_fd(parent_fd)
            finally:
                os.close(parent_fd)

    def missing_dirs(self, host_dir: str) -> list[str]:
        """The directories `makedirs(host_dir)` would create, outermost first."""
        parts = [p for p in host_dir.split("/") if p]
        prefixes = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return [p for p in prefixes if self.lstat(p, follow=True) is None]

    def rmdir_if_empty(self, host_dir: str) -> bool:
        """Remove a directory divingbell made, if nothing else lives in it now."""
        try:
            with self._parent(host_dir) as (parent, name):
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode):
                    return False
                os.rmdir(name, dir_fd=parent)
                fsync_fd(parent)
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                return False
            raise

    def write_atomic(
        self,
        host_path: str,
        content: str | bytes,
        mode: int = 0o644,
        owner: tuple[int, int] | None = None,
        dir_mode: int | None = None,
        *,
        user_dir: UserDir | None = None,
        created: list[str] | None = None,
        durable: bool = True,
    ) -> None:
        """Write a file so readers see the old or the new content, never a torn one.

        Temp file in the same directory (opened through the directory's descriptor), fsync,
        rename, fsync the directory. `owner` (uid, gid) owns the file and, with `dir_mode`,
        the directories that have to be created (listed in `created`). `durable=False` skips
        the fsyncs, for reports that the next run rewrites anyway.
        """
        data = content.encode(errors="surrogateescape") if isinstance(content, str) else content
        with self._parent(host_path, create=True, dir_mode=dir_mode, owner=owner,
                          user_dir=user_dir, created=created) as (parent, name):
            _clean_temp(parent, name)
            tmp, fd = _create_temp(parent, name)
            try:
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
                os.close(fd)
                fd = -1
                fault_point("write")
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                raise
            if durable:
                fsync_fd(parent)

    def clean_temp_files(self, host_path: str) -> list[str]:
        """Remove temp files a killed write of `host_path` left behind (`.name.XXXXXXXX`)."""
        directory, name = _split(host_path)
        try:
            # Only through root's own symlinks: ~/.ssh may be a user's link to elsewhere.
            parent = self._open(directory, os.O_RDONLY | os.O_DIRECTORY, root_links_only=True)
        except OSError:
            return []
        try:
            return [f"{directory.rstrip('/')}/{n}" for n in _clean_temp(parent, name)]
        finally:
            os.close(parent)

    def remove(self, host_path: str, *, user_dir: UserDir | None = None) -> bool:
        """Remove a file (or symlink) inside the root; False when it was already gone."""
        try:
            with self._parent(host_path, user_dir=user_dir) as (parent, name):
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    raise UnsafePath(host_path, "is a directory, not a file divingbell wrote")
                os.unlink(name, dir_fd=parent)
                fsync_fd(parent)
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def file_meta(self, host_path: str, *, user_dir: UserDir | None = None
                  ) -> tuple[int, int, int] | None:
        """(mode, uid, gid) of a file, not following a final symlink; None when absent."""
        try:
            with self._parent(host_path, user_dir=user_dir) as (parent, name):
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid

    def set_owner_mode(self, host_path: str, uid: int, gid: int, mode: int) -> None:
        """chown and chmod the path inside the root; a symlink is refused, never followed, and
        on the way only root's own symlinks are (a user cannot redirect the chown). A file
        with several hard links is refused: another of its names may be /etc/shadow."""
        fd = self._open(host_path, os.O_PATH, follow=False, root_links_only=True)
        try:
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):
                raise UnsafePath(host_path, "is a symlink; name the file it points to")
            if hard_linked(info):
                raise UnsafePath(host_path, HARD_LINKED)
            # An O_PATH descriptor cannot be fchown'd; its /proc/self/fd link names exactly
            # this inode, whatever happens to the path meanwhile.
            through = f"/proc/self/fd/{fd}"
            os.chown(through, uid, gid)
            os.chmod(through, mode)
        finally:
            os.close(fd)

    def chmod_dir(self, host_dir: str, mode: int) -> None:
        """chmod a directory found inside the root (symlinks followed inside it)."""
        fd = self._open(host_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def symlink(self, link_target: str, host_path: str, *,
                created: list[str] | None = None) -> None:
        """Create (or replace) a symlink at `host_path` pointing to `link_target` as written."""
        with self._parent(host_path, create=True, created=created) as (parent, name):
            with contextlib.suppress(OSError):
                if os.readlink(name, dir_fd=parent) == link_target:
                    return
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    raise UnsafePath(host_path, "is a directory")
                os.unlink(name, dir_fd=parent)
            os.symlink(link_target, name, dir_fd=parent)
            fsync_fd(parent)

    def is_symlink_free(self, host_path: str) -> bool:
        """Whether the path exists with no symlink in any of its components."""
        try:
            fd = self._open(host_path, os.O_PATH, follow=False, no_symlinks=True)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except (UnsafePath, OSError):
            return False
        os.close(fd)
        return True

    def user_ids(self, user: str) -> tuple[int, int]:
        """uid and gid of a user in the host's own /etc/passwd (not this process's NSS)."""
        for line in (self.read_text("/etc/passwd") or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(f"no user {user!r} in {self.path('/etc/passwd')}")

    def is_systemd_running(self) -> bool:
        """Whether systemd is PID 1 of the host (sd_booted(3): /run/systemd/system exists)."""
        return self.is_dir("/run/systemd/system")


@dataclass(frozen=True)
class UserDir:
    """A directory a user controls (their home): the user's ids, for StrictModes checks."""

    path: str
    uid: int
    gid: int


def _check_strict(fd: int, shown: str, user_dir: UserDir) -> None:
    info = os.fstat(fd)
    if info.st_uid not in (0, user_dir.uid):
        raise UnsafePath(shown, f"belongs to uid {info.st_uid}, not to root or the user "
                         f"(uid {user_dir.uid}); refusing to write there")
    if info.st_mode & 0o022:
        raise UnsafePath(shown, f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                         "refusing to write there, as sshd would refuse to read it")


def _relative(host_path: str) -> str:
    text = str(host_path)
    if not text.startswith("/"):
        raise ValueError(f"host paths are absolute, got {text!r}")
    return text.lstrip("/") or "."


def _split(host_path: str) -> tuple[str, str]:
    text = str(host_path).rstrip("/")
    parent, _, name = text.rpartition("/")
    if name in ("", ".", "..") or not text.startswith("/"):
        raise ValueError(f"{host_path!r} does not name a file")
    return parent or "/", name


_MAGIC = re.compile(r"[*?[]")
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _has_magic(part: str) -> bool:
    return _MAGIC.search(part) is not None


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.[{_TEMP_CHARS}]{{8}}$")


def _create_temp(parent: int, name: str) -> tuple[str, int]:
    for _ in range(100):
        # os.urandom rather than `secrets`: the name need not be secret, only unguessable
        # enough, and `secrets` costs every run ~8 ms of imports (random, base64, hmac).
        tmp = f".{name}." + "".join(_TEMP_CHARS[b % 36] for b in os.urandom(8))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent)
        except FileExistsError:
            continue
        return tmp, fd
    raise FileExistsError(errno.EEXIST, "no free temporary name", name)


def _clean_temp(parent: int, name: str) -> list[str]:
    """Temp files of `name` are ours alone (the host lock is held): any left is stale."""
    pattern = _temp_pattern(name)
    removed = []
    for entry in os.listdir(parent):
        if pattern.match(entry):
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(entry, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                    os.unlink(entry, dir_fd=parent)
                    removed.append(entry)
    return removed


# Set by SIGTERM/SIGINT handlers (`divingbell apply`): the engine stops between changes, and a
# running operator script's process group is killed.
interrupt = threading.Event()

FAULT_ENV = "DIVINGBELL_FAULT_KILL_AT"
_fault_counter = [0]


def fault_point(kind: str) -> None:
    """Test hook: with DIVINGBELL_FAULT_KILL_AT=<kind>:N set, SIGKILL this process at the
    N-th point of that kind (`change`: before a change; `write`: between writing a temp file
    and renaming it). Only the crash-injection tests set it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_kind, _, number = spec.partition(":")
    if want_kind != kind:
        return
    _fault_counter[0] += 1
    if number.isdigit() and _fault_counter[0] == int(number):
        os.kill(os.getpid(), signal.SIGKILL)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_fd(fd: int) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        os.fsync(fd)
