"""One apply at a time per host: an advisory lock on a file in divingbell's state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from divingbell.core.engine.journal import STATE_DIR, ensure_state_dir
from divingbell.core.errors import LockTimeout
from divingbell.core.host import Host
from divingbell.core.safepath import open_in_root

LOCK_FILE = f"{STATE_DIR}/apply.lock"


@contextlib.contextmanager
def host_lock(host: Host, timeout: float = 10.0, poll: float = 0.05) -> Iterator[None]:
    """Hold the host's apply lock; wait up to `timeout` seconds, then fail naming the holder."""
    path = host.path(LOCK_FILE)
    ensure_state_dir(host)
    root_fd = host.open_root()
    try:
        fd = open_in_root(root_fd, LOCK_FILE.lstrip("/"), os.O_RDWR | os.O_CREAT, 0o600,
                          follow=False, shown=LOCK_FILE)
    finally:
        os.close(root_fd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise LockTimeout(
                        f"another divingbell run (pid {holder}) holds {path}; "
                        f"waited {timeout:g}s. Try again when it finishes."
                    ) from None
                time.sleep(poll)
        with contextlib.suppress(OSError):  # the pid is for the message only (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
