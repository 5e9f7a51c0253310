"""Print the OS image's build time and size: a build from the cache's .debs (or from nothing with
--cold), then the same build again (found in the cache by its inputs), and whether two packings
of the built root are byte-identical.

    sudo .venv/bin/python bench/os_image.py [--cache DIR] [--cold] [--mirror URL]

The cache defaults to the tests' (/var/cache/divingbell-test/os), so a bench after the tests
measures the cached path; --cold uses an empty temporary cache (downloads every .deb).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from divingbell.image.os import DEFAULT_MIRROR, build_os_image, pack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/divingbell-test/os"))
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="os-bench-") as scratch_name:
        scratch = Path(scratch_name)
        cache = scratch / "cache" if args.cold else args.cache
        for run in ("first", "again"):
            started = time.monotonic()
            built = build_os_image(scratch / run, mirror=args.mirror, cache=cache)
            print(f"{run}: {time.monotonic() - started:.1f} s, "
                  f"{'from the cache' if built.reused else 'built'}; "
                  f"root.tar.gz {built.size / 1e6:.1f} MB, {len(built.packages)} packages, "
                  f"Linux {built.kernel_version}")
        root = scratch / "root"
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "-xzf", str(built.tarball)], check=True)
        unpacked = subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[0]
        digests = []
        for index in range(2):
            started = time.monotonic()
            pack(root, scratch / f"repack-{index}.tar.gz", epoch=1704067200)
            digests.append(hashlib.sha256(
                (scratch / f"repack-{index}.tar.gz").read_bytes()).hexdigest())
            print(f"pack {index + 1}: {time.monotonic() - started:.1f} s")
        print(f"unpacked root: {unpacked} MB; two packings of it identical: "
              f"{digests[0] == digests[1]}")


if __name__ == "__main__":
    main()
