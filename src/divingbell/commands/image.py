"""`divingbell image`: build boot images from Debian packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from divingbell.image.discovery import (
    DEFAULT_CACHE,
    DEFAULT_MODULES,
    KERNEL_PACKAGE,
    ImageError,
    build_discovery_image,
)


@click.group()
def image() -> None:
    """Build boot images (the network-boot discovery image)."""


@image.command()
@click.option("-o", "--output", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for vmlinuz, initrd.img and image.json (created if missing). "
              "Serve it with `divingbell serve --assets DIR`.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE,
              show_default=True,
              help="Keeps the downloaded .debs and the extracted kernel, so rebuilds are fast.")
@click.option("--kernel-package", default=KERNEL_PACKAGE, show_default=True,
              help="The Debian kernel package (a metapackage is followed to its image).")
@click.option("--module", "modules", multiple=True, metavar="NAME",
              help="A kernel module to load at boot (NIC and disk drivers). Repeat for several; "
              f"replaces the default list: {', '.join(DEFAULT_MODULES)}.")
@click.option("--hook", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="An executable install step to run instead of the built-in one (which "
              "writes a partition table and an 'installed' marker to the first disk).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def discovery(output: Path, cache: Path, kernel_package: str, modules: tuple[str, ...],
              hook: Path | None, output_format: str) -> None:
    """Build the discovery image: Debian's kernel and a busybox initramfs.

    Machines network-boot it (iPXE, from `divingbell serve`): it brings the network up by DHCP,
    reports the machine's facts to the fleet service, waits for a role and an install grant,
    runs the install step, reports the result and reboots. Packages come from apt
    (`apt-get download`, verified against apt's SHA256); nothing is installed on this machine.
    The same packages always give the same bytes.

    \b
    Example:
      divingbell image discovery -o /srv/divingbell/assets
      divingbell serve --assets /srv/divingbell/assets
    """
    try:
        built = build_discovery_image(output, cache=cache, kernel_package=kernel_package,
                                      modules=modules or DEFAULT_MODULES, hook=hook)
    except ImageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    summary = built.summary()
    if output_format == "json":
        click.echo(json.dumps(summary, indent=2))
        return
    packages = ", ".join(f"{p.name} {p.version}" for p in built.packages)
    click.echo(f"kernel  {built.kernel} ({built.kernel.stat().st_size / 1e6:.1f} MB, "
               f"Linux {built.kernel_version})")
    click.echo(f"initrd  {built.initrd} ({built.initrd.stat().st_size / 1e6:.1f} MB, "
               f"{len(built.modules)} module files)")
    click.echo(f"from    {packages}")
    for note in built.notes:
        click.echo(f"note: {note}")
    click.echo(f"built in {built.seconds:.1f} s"
               f"{' (kernel reused from the cache)' if built.reused_kernel_bundle else ''}; "
               f"manifest {built.manifest}")
