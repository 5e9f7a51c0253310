"""The uamlite module's configuration: users, their SSH keys, password hashes and sudo."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator

from divingbell.core.document.fields import StrictModel, plain_text
from divingbell.core.document.keys import CRYPT_PREFIXES
from divingbell.core.document.types import single_line

SSH_KEY_TYPES = (
    "ssh-rsa", "ssh-dss", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _ssh_key(value: Any) -> str:
    text = single_line(plain_text(value).strip())
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(
            f"not an SSH public key: must start with one of {', '.join(SSH_KEY_TYPES)}"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {parts[0]} key's body is not valid base64") from None
    name_length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + name_length].decode(errors="replace") != parts[0]:
        raise ValueError(f"the key's body does not encode a {parts[0]} key")
    return text


def _ssh_keys(value: Any) -> Any:
    if value in (["Unmanaged"], "Unmanaged"):
        return None
    return value


def _crypt(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else plain_text(value)
    if not text.startswith(CRYPT_PREFIXES) or len(text.split("$")) < 4 or not re.match(
            r"^[A-Za-z0-9./$=,+-]+$", text):
        raise ValueError(
            "must be a crypt(3) hash in one of the formats " + " ".join(CRYPT_PREFIXES)
            + " (not a plain password)"
        )
    return text


class User(StrictModel):
    user_name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,30}[$]?$")]
    user_sudo: bool = False
    user_sshkeys: Annotated[
        list[Annotated[str, BeforeValidator(_ssh_key)]] | None,
        BeforeValidator(_ssh_keys),
        Field(description="Public keys for authorized_keys; [Unmanaged] leaves the file alone."),
    ] = []
    user_crypt_passwd: Annotated[
        SecretStr | None, BeforeValidator(lambda v: None if v is None else _crypt(v))
    ] = None


class UamliteConf(StrictModel):
    purge_expired_users: bool = False
    users: list[User] = []
    allow_lockout: bool = Field(
        False,
        description="Apply even if the document would remove the host's last key+sudo login.",
    )

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[User]) -> list[User]:
        names = [user.user_name for user in users]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"users listed more than once: {', '.join(duplicates)}")
        return users


