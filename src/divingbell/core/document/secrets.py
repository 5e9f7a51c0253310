"""Masking secrets in anything divingbell prints from a document (`render`, text and JSON).

What counts as a secret: password hashes (`user_crypt_passwd`), every exec `env` value
(scripts get their credentials there), debconf answers to `password` questions, the password
in a URL's user-info (`https://user:secret@mirror/`) and `password=`/`pass=` mount options
(cifs). Keys and structure stay visible, so a reader can still see that a value is set.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "**********"  # what pydantic prints for a SecretStr, so every mask looks the same

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]*(?=@)")
_OPTION_PASSWORD = re.compile(r"(?P<head>(?:^|,)(?:password|pass|passwd)=)[^,]*")


def mask_secrets(module: str, data: Any) -> Any:
    """A copy of one module's dumped configuration with every secret masked."""
    masked = _mask_strings(data)
    if module == "exec" and isinstance(masked, dict):
        for script in masked.values():
            if isinstance(script, dict) and isinstance(script.get("env"), dict):
                script["env"] = {name: MASK for name in script["env"]}
    elif module == "apt" and isinstance(masked, dict):
        for package in masked.get("packages") or []:
            for answer in (package.get("debconf") or []) if isinstance(package, dict) else []:
                if isinstance(answer, dict) and answer.get("question_type") == "password":
                    answer["answer"] = MASK
    elif module == "uamlite" and isinstance(masked, dict):
        for user in masked.get("users") or []:
            if isinstance(user, dict) and user.get("user_crypt_passwd") is not None:
                user["user_crypt_passwd"] = MASK
    elif module == "mounts" and isinstance(masked, dict):
        for mount in masked.values():
            if isinstance(mount, dict) and isinstance(mount.get("options"), str):
                mount["options"] = _OPTION_PASSWORD.sub(lambda m: m["head"] + MASK,
                                                        mount["options"])
    return masked


def _mask_strings(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _mask_strings(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_mask_strings(value) for value in data]
    if isinstance(data, str) and "://" in data:
        return _URL_PASSWORD.sub(lambda m: m["head"] + MASK, data)
    return data


def mask_document(data: Any) -> Any:
    """A copy of a whole document (as loaded YAML, overrides included) with every secret
    masked: each module's base conf and each of its label and host overrides. For showing a
    stored revision to someone who may read it but not its secrets (a fleet reader)."""
    if not isinstance(data, dict) or not isinstance(data.get("conf"), dict):
        return _mask_strings(data)
    conf: dict[str, Any] = {}
    for module, value in data["conf"].items():
        if module == "overrides" and isinstance(value, dict):
            conf[module] = {section: _mask_overrides(str(section).removeprefix("divingbell_"),
                                                     overrides)
                            for section, overrides in value.items()}
        else:
            conf[module] = mask_secrets(str(module), value)
    return {**_mask_strings({k: v for k, v in data.items() if k != "conf"}), "conf": conf}


def _mask_overrides(module: str, overrides: Any) -> Any:
    """An override's conf holds its module's section (`conf: {sysctl: {...}}`)."""
    if not isinstance(overrides, dict):
        return _mask_strings(overrides)
    masked = dict(overrides)
    for kind in ("labels", "hosts"):
        entries = overrides.get(kind)
        if isinstance(entries, list):
            masked[kind] = [
                {**entry, "conf": _mask_sections(entry.get("conf"), module)}
                if isinstance(entry, dict) else _mask_strings(entry) for entry in entries]
    return masked


def _mask_sections(conf: Any, module: str) -> Any:
    if not isinstance(conf, dict):
        return mask_secrets(module, conf)
    return {name: mask_secrets(str(name), value) for name, value in conf.items()}
