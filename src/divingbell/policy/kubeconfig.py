"""A tenant's `~/.kube/config`, read and written without ever following a link.

The home directory belongs to the tenant, who may have planted symlinks, hard links or FIFOs
anywhere under it. Every path component is opened relative to its parent's descriptor with
O_NOFOLLOW (a symlink anywhere is refused, not followed); the file is read only if it is a
regular file with one link, owned by the tenant or root; it is written to a new file created
O_EXCL in the same directory, fchown'd to the tenant and 0600 before any secret is written,
then renamed over the old name (which replaces a link, never writes through it). An existing
kubeconfig that parses is merged (only divingbell's own cluster, user and context entries
change); one that does not is left untouched and reported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from divingbell.core.errors import DivingbellError

MAX_SIZE = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class HomeError(DivingbellError):
    """The kubeconfig cannot be delivered safely; the message says what was found."""


@dataclass(frozen=True)
class Entries:
    """divingbell's entries in a kubeconfig: one cluster, one user, one context."""

    cluster: str
    user: str
    context: str
    namespace: str


@contextlib.contextmanager
def _open_dir(path: str, *, create: tuple[int, int] | None = None) -> Iterator[int]:
    """A descriptor of directory `path`, every component opened O_NOFOLLOW from `/`.
    With `create=(uid, gid)` the last component is made (0700, owned so) when absent."""
    if not path.startswith("/"):
        raise HomeError(f"{path!r} is not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise HomeError(f"{path!r} contains '..'")
    fd = os.open("/", _DIR_FLAGS)
    try:
        for index, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None or index != len(parts) - 1:
                    raise HomeError(f"{path} does not exist") from None
                os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchown(child, *create)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/" + "/".join(parts[: index + 1])
                    raise HomeError(f"{where} is a symlink or not a directory; refusing to "
                                    "follow it") from None
                raise HomeError(f"cannot open {path}: {exc.strerror}") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _check_owner(fd: int, where: str, uid: int) -> None:
    info = os.fstat(fd)
    if info.st_uid not in (uid, 0):
        raise HomeError(f"{where} is owned by uid {info.st_uid}, not the tenant ({uid}) or "
                        "root; left untouched")


@dataclass(frozen=True)
class Existing:
    """What is at ~/.kube/config now: nothing (data None, problem None), a kubeconfig
    (data), or something divingbell must not touch (problem)."""

    data: dict[str, Any] | None = None
    problem: str | None = None


def read(home: str, uid: int) -> Existing:
    try:
        with _open_dir(home) as home_fd:
            _check_owner(home_fd, home, uid)
            try:
                kube_fd = os.open(".kube", _DIR_FLAGS, dir_fd=home_fd)
            except FileNotFoundError:
                return Existing()
            except OSError as exc:
                return Existing(problem=f"{home}/.kube is a symlink or not a directory "
                                f"({exc.strerror}); left untouched")
            try:
                _check_owner(kube_fd, f"{home}/.kube", uid)
                return _read_config(kube_fd, f"{home}/.kube/config", uid)
            finally:
                os.close(kube_fd)
    except HomeError as exc:
        return Existing(problem=str(exc))


def _read_config(kube_fd: int, where: str, uid: int) -> Existing:
    try:
        fd = os.open("config", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=kube_fd)
    except FileNotFoundError:
        return Existing()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Existing(problem=f"{where} is a symlink; left untouched")
        return Existing(problem=f"cannot open {where}: {exc.strerror}; left untouched")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Existing(problem=f"{where} is not a regular file; left untouched")
        if info.st_nlink != 1:
            return Existing(problem=f"{where} has {info.st_nlink} hard links; left untouched")
        if info.st_uid not in (uid, 0):
            return Existing(problem=f"{where} is owned by uid {info.st_uid}; left untouched")
        if info.st_size > MAX_SIZE:
            return Existing(problem=f"{where} is larger than {MAX_SIZE} bytes; left untouched")
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(MAX_SIZE + 1)
    finally:
        os.close(fd)
    problem = _kubeconfig_problem(raw)
    if problem:
        return Existing(problem=f"{where} is not a valid kubeconfig ({problem}); left "
                        "untouched")
    data = yaml.safe_load(raw) or {}
    return Existing(data=data)


def _kubeconfig_problem(raw: bytes) -> str | None:
    if not raw.strip():
        return None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        return f"not YAML: {getattr(exc, 'problem', None) or exc}"
    if data is None:
        return None
    if not isinstance(data, dict):
        return "not a mapping"
    if data.get("kind", "Config") != "Config":
        return f"kind is {data.get('kind')!r}, not Config"
    for section in ("clusters", "users", "contexts"):
        items = data.get(section)
        if items is None:
            continue
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
            return f"{section} must be a list of entries with a name"
    return None


def merged(existing: Mapping[str, Any] | None, entries: Entries, cluster: Mapping[str, Any],
           user: Mapping[str, Any]) -> dict[str, Any]:
    """`existing` with divingbell's three entries set and everything else kept."""
    out: dict[str, Any] = dict(existing or {})
    out.setdefault("apiVersion", "v1")
    out["kind"] = "Config"
    out.setdefault("preferences", {})

    def put(section: str, name: str, key: str, value: Mapping[str, Any]) -> None:
        items = [i for i in out.get(section) or [] if i.get("name") != name]
        out[section] = [*items, {"name": name, key: dict(value)}]

    put("clusters", entries.cluster, "cluster", cluster)
    put("users", entries.user, "user", user)
    put("contexts", entries.context, "context", {
        "cluster": entries.cluster, "user": entries.user, "namespace": entries.namespace})
    if not out.get("current-context"):
        out["current-context"] = entries.context
    return out


def without(existing: Mapping[str, Any], entries: Entries) -> dict[str, Any] | None:
    """`existing` without divingbell's user and context (None when nothing else is left)."""
    out = dict(existing)
    for section, name in (("users", entries.user), ("contexts", entries.context)):
        out[section] = [i for i in out.get(section) or [] if i.get("name") != name]
    used = {(i.get("context") or {}).get("cluster") for i in out["contexts"]}
    if entries.cluster not in used:
        out["clusters"] = [i for i in out.get("clusters") or []
                           if i.get("name") != entries.cluster]
    if out.get("current-context") == entries.context:
        out["current-context"] = ""
    if not out["users"] and not out["contexts"] and not out.get("clusters"):
        return None
    return out


def user_entry(existing: Mapping[str, Any] | None, entries: Entries) -> Mapping[str, Any]:
    for item in (existing or {}).get("users") or []:
        if item.get("name") == entries.user and isinstance(item.get("user"), dict):
            user: Mapping[str, Any] = item["user"]
            return user
    return {}


def write(home: str, uid: int, gid: int, data: Mapping[str, Any], *,
          create_home: bool = False) -> None:
    """Write `data` as ~/.kube/config for the tenant (0600, owned by uid:gid)."""
    text = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False).encode()
    parent, _, name = home.rstrip("/").rpartition("/")
    if create_home:
        with _open_dir(parent or "/") as parent_fd:
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
                os.fchown(fd, uid, gid)
                os.close(fd)
            except FileExistsError:
                pass
    with _open_dir(home) as home_fd:
        _check_owner(home_fd, home, uid)
        try:
            kube_fd = os.open(".kube", _DIR_FLAGS, dir_fd=home_fd)
        except FileNotFoundError:
            os.mkdir(".kube", 0o700, dir_fd=home_fd)
            kube_fd = os.open(".kube", _DIR_FLAGS, dir_fd=home_fd)
            os.fchown(kube_fd, uid, gid)
        except OSError as exc:
            raise HomeError(f"{home}/.kube is a symlink or not a directory "
                            f"({exc.strerror}); left untouched") from None
        try:
            _check_owner(kube_fd, f"{home}/.kube", uid)
            _replace(kube_fd, f"{home}/.kube/config", uid, gid, text)
        finally:
            os.close(kube_fd)


def remove(home: str, uid: int, gid: int, entries: Entries) -> bool:
    """Take divingbell's entries out of the tenant's kubeconfig (deleting the file if they
    were all it held). False when there was nothing to remove."""
    existing = read(home, uid)
    if existing.problem is not None:
        if "does not exist" in existing.problem:
            return False
        raise HomeError(existing.problem)
    if existing.data is None:
        return False
    rest = without(existing.data, entries)
    if rest is None:
        with _open_dir(home) as home_fd, _open_kube(home_fd) as kube_fd:
            os.unlink("config", dir_fd=kube_fd)
        return True
    if rest == existing.data:
        return False
    write(home, uid, gid, rest)
    return True


@contextlib.contextmanager
def _open_kube(home_fd: int) -> Iterator[int]:
    fd = os.open(".kube", _DIR_FLAGS, dir_fd=home_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _replace(dir_fd: int, where: str, uid: int, gid: int, data: bytes) -> None:
    temp = f".config.divingbell-{secrets.token_hex(6)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp, dir_fd=dir_fd)
        raise
    os.close(fd)
    try:
        os.rename(temp, "config", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        os.unlink(temp, dir_fd=dir_fd)
        raise HomeError(f"cannot replace {where}: {exc.strerror}") from None
