"""A throwaway OpenLDAP server (Debian's slapd) for the session: a cn=config directory built
with slapadd in a temporary directory, listening on a loopback port, removed afterwards."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "test-only-secret"
PEOPLE = f"ou=people,{SUFFIX}"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")


def available() -> str | None:
    """Why slapd cannot run here, or None."""
    for tool in ("slapd", "slapadd"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (Debian package slapd)"
    for schema in SCHEMAS:
        if not Path(f"/etc/ldap/schema/{schema}.ldif").exists():
            return f"/etc/ldap/schema/{schema}.ldif is missing"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Slapd:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start(directory: Path) -> Slapd:
    config, data = directory / "config", directory / "data"
    config.mkdir()
    data.mkdir()
    includes = "\n".join(f"include: file:///etc/ldap/schema/{s}.ldif" for s in SCHEMAS)
    (directory / "config.ldif").write_text(f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory}/slapd.pid

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {data}
olcSuffix: {SUFFIX}
olcRootDN: {ADMIN_DN}
olcRootPW: {ADMIN_PASSWORD}
olcDbMaxSize: 67108864
olcAccess: to * by dn.exact={ADMIN_DN} write by * read
""")
    (directory / "base.ldif").write_text(f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: example
dc: example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people
""")
    for number, ldif in (("0", "config.ldif"), ("1", "base.ldif")):
        subprocess.run(["slapadd", "-n", number, "-F", str(config), "-l",
                        str(directory / ldif)], check=True, capture_output=True)
    for _ in range(5):
        port = _free_port()
        process = subprocess.Popen(["slapd", "-h", f"ldap://127.0.0.1:{port}/", "-F",
                                    str(config), "-d", "0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return Slapd(directory, port, process)
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait()
    raise RuntimeError("slapd did not start on a loopback port")
