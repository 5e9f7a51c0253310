"""The apparmor module's configuration: profiles by name, loaded or only written."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator

from divingbell.core.document.fields import StrictModel, Switch, check_name_keys


class AppArmorConf(StrictModel):
    # Divingbell wrote "true"/"false" strings (and took "false" as true): both mean what they say.
    complain_mode: Switch = False
    profiles: Annotated[dict[str, str], BeforeValidator(check_name_keys)] = {}
    # An extension: false writes (and syntax-checks) profiles without loading them, for hosts
    # whose AppArmor is enabled at a later boot.
    load: Switch = True


