"""Open a path inside a root directory without ever leaving it.

`open_in_root(root_fd, "etc/sysctl.d/x.conf", flags)` resolves the path the way the host
itself would if it were chrooted at `root_fd`: `..` stops at the root, an absolute symlink
starts again from the root. Linux's openat2(2) with RESOLVE_IN_ROOT does this in the kernel
(atomically, no races); where it is missing (kernels before 5.6, or a seccomp filter that
refuses it) the same walk is done here one component at a time with O_NOFOLLOW and directory
descriptors. `no_symlinks` refuses every symlink on the way (RESOLVE_NO_SYMLINKS).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from divingbell.core.errors import UnsafePath

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
MAX_SYMLINKS = 40  # as the kernel's own limit

_SYS_OPENAT2: int | None = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437,
                "s390x": 437}.get(os.uname().machine)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# None: not tried yet. Tests set it to False to exercise the fallback walk.
openat2_available: bool | None = None if _SYS_OPENAT2 is not None else False


def _openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    assert _SYS_OPENAT2 is not None
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0,
                   resolve)
    encoded = os.fsencode(path)
    for _ in range(1000):
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd),
                           ctypes.c_char_p(encoded), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0, *, follow: bool = True,
                 no_symlinks: bool = False, root_links_only: bool = False,
                 shown: str | None = None) -> int:
    """A descriptor for `path` (relative to the root) opened with `flags`.

    `follow`: a symlink as the last component is followed (inside the root); otherwise it is
    opened itself with O_PATH, or refused with ELOOP. Raises UnsafePath for a symlink when
    `no_symlinks`, FileNotFoundError and friends as open(2) would. `root_links_only`: follow
    only symlinks owned by root (fs.protected_symlinks for any directory): a path through a
    directory a user can write into cannot be redirected by that user (always the walk).
    """
    global openat2_available
    shown = shown or "/" + path
    if not follow:
        flags |= os.O_NOFOLLOW
    resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | (RESOLVE_NO_SYMLINKS if no_symlinks
                                                         else 0)
    if openat2_available is not False and not root_links_only:
        try:
            fd = _openat2(root_fd, path, flags, mode, resolve)
            openat2_available = True
            return fd
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM) and openat2_available is None:
                openat2_available = False
            elif exc.errno == errno.ELOOP and no_symlinks:
                raise UnsafePath(shown, "has a symlink in its path; refusing to follow it"
                                 ) from None
            else:
                raise OSError(exc.errno, exc.strerror, shown) from None
    return _walk(root_fd, path, flags, mode, no_symlinks=no_symlinks,
                 root_links_only=root_links_only, shown=shown)


def _walk(root_fd: int, path: str, flags: int, mode: int, *, no_symlinks: bool,
          shown: str, root_links_only: bool = False) -> int:
    """RESOLVE_IN_ROOT by hand: one component at a time, never following a symlink with the
    kernel; each link's text is spliced into the remaining path and resolved the same way."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    stack = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    links = 0
    try:
        while True:
            if not parts:
                # The path was the root itself, or ended in `..`.
                return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=stack[-1])
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last = not parts
            try:
                info = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if last and flags & os.O_CREAT:
                    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                   dir_fd=stack[-1])
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                        shown) from None
            if stat.S_ISLNK(info.st_mode) and not (last and flags & os.O_NOFOLLOW):
                if no_symlinks:
                    raise UnsafePath(shown, "has a symlink in its path; refusing to follow it")
                if root_links_only and info.st_uid != 0:
                    raise UnsafePath(shown, f"passes a symlink ({name}) owned by uid "
                                     f"{info.st_uid}; only root's symlinks are followed here")
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), shown)
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if last:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                               dir_fd=stack[-1])
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), shown)
            stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, dir_fd=stack[-1]))
    finally:
        for fd in stack:
            os.close(fd)
