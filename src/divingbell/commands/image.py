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
    """Build boot images (the network-boot discovery image, the OS the install writes)."""


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


@image.command("os")
@click.option("-o", "--output", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for root.tar.gz, root.tar.gz.sha256 and os.json (created if "
              "missing). Put it under the assets directory as `os`, e.g. ASSETS/os: the default "
              "install hook fetches /v1/assets/os/root.tar.gz.")
@click.option("--release", default="bookworm", show_default=True,
              help="The Debian release to debootstrap.")
@click.option("--packages", "packages", multiple=True, metavar="NAME[,NAME...]",
              help="More Debian packages to install (repeat, or separate with commas). Always "
              "installed: the kernel, GRUB for BIOS and UEFI, systemd, openssh-server, python3.")
@click.option("--mirror", default="http://deb.debian.org/debian", show_default=True,
              help="The Debian mirror (also written to the image's sources.list).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/cache/divingbell/os"), show_default=True,
              help="Keeps the .debs and finished builds: the same inputs are not built twice.")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output for people or for scripts.")
def os_image(output: Path, release: str, packages: tuple[str, ...], mirror: str, cache: Path,
             output_format: str) -> None:
    """Build the operating system the default install hook writes to a machine's disk.

    A Debian root (debootstrap from --mirror) with its kernel, GRUB for BIOS and UEFI,
    systemd, openssh-server and divingbell in /opt/divingbell with the fleet agent's unit
    enabled, packed as a gzip'd tarball with its SHA256. Machines installed from it boot their
    disk and their agent reports to the fleet service as the same machine. Run as root
    (debootstrap, chroot). The same inputs give the same bytes (SOURCE_DATE_EPOCH sets the
    clamped file times); a build is cached by its inputs.

    \b
    Example:
      divingbell image discovery -o /srv/divingbell/assets
      divingbell image os -o /srv/divingbell/assets/os
      divingbell serve --assets /srv/divingbell/assets
    """
    from divingbell.image.os import OsImageError, build_os_image

    names = [name for group in packages for name in group.split(",") if name]
    try:
        built = build_os_image(output, release=release, packages=names, mirror=mirror,
                               cache=cache)
    except OsImageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if output_format == "json":
        click.echo(json.dumps(built.summary(), indent=2))
        return
    click.echo(f"image   {built.tarball} ({built.size / 1e6:.1f} MB, sha256 {built.sha256})")
    click.echo(f"from    Debian {release}, {len(built.packages)} packages, "
               f"Linux {built.kernel_version}")
    click.echo(f"{'reused from the cache' if built.reused else 'built'} in "
               f"{built.seconds:.1f} s")
