"""The `divingbell` command group. Parsing and printing only: the work is in document and engine.

The host commands are in divingbell/commands/host.py, the other groups in divingbell/commands/
(imported on first use). Imports of the heavier parts happen inside each command so
`divingbell --help` stays instant.
Exit codes: 0 success; 1 apply or plan failed on the host; 2 invalid document or usage;
3 another run holds the host lock. `plan --detailed-exitcode`: 0 no changes, 2 changes, 1 error.
"""

from __future__ import annotations

import functools
import gettext

import click

from divingbell import __version__

# click translates its own help texts through gettext as commands are declared: with no
# catalogue for the locale, every call searches the locale directories again (about 10 ms for
# the host commands). Remember the answer while they are declared; put gettext back after.
_gettext_find = gettext.find
gettext.find = functools.lru_cache(maxsize=64)(_gettext_find)  # type: ignore[assignment]


# Command groups that live in their own files under divingbell/commands/, imported only when
# used: the node agent's commands stay fast and need none of the service's dependencies. A group
# whose module is absent (an optional part not installed) is simply not listed. Each has its
# line for `divingbell --help` here, so listing them imports none of them.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("divingbell.commands.serve:serve",
              "Run the fleet service: API, network boot, web UI."),
    "fleet": ("divingbell.commands.fleet:fleet",
              "Operate the fleet service: machines, revisions, rollouts."),
    "discover": ("divingbell.commands.discover:discover",
                 "Report this machine's facts to the fleet service."),
    "image": ("divingbell.commands.image:image",
              "Build boot images (the network-boot discovery image)."),
    "node": ("divingbell.commands.node:node",
             "Node maintenance by hand: cordon, drain, reboot, release."),
    "pki": ("divingbell.commands.pki:pki",
            "Generate and check a cluster's certificates and keys."),
    "bootstrap": ("divingbell.commands.bootstrap:bootstrap",
                  "Build join scripts that make hosts Kubernetes nodes."),
    "policy": ("divingbell.commands.policy:policy",
               "Admission webhooks for shared clusters."),
    "tenants": ("divingbell.commands.tenants:tenants",
                "Tenant accounts: namespaces, quotas, certificates."),
    "documents": ("divingbell.commands.documents:documents",
                  "List and prune the document Secrets in a cluster."),
    "recover": ("divingbell.commands.recover:recover",
                "Repair divingbell's journal after it was lost or damaged."),
}


# The extra (pyproject.toml) each lazily imported group's optional dependencies come from.
EXTRAS = {"serve": "fleet", "fleet": "fleet", "pki": "bootstrap",
          "bootstrap": "bootstrap", "policy": "policy", "tenants": "policy"}


def _missing_dependency(command: str, exc: ModuleNotFoundError) -> click.ClickException:
    extra = EXTRAS.get(command, "fleet,bootstrap,policy")
    return click.ClickException(
        f"'divingbell {command}' needs {exc.name}, which is not installed: "
        f"pip install 'divingbell[{extra}]'")


class LazyGroup(click.Group):
    """A click group whose extra commands are imported on first use."""

    def invoke(self, ctx: click.Context) -> object:
        # A group's optional dependencies are imported when a subcommand needs them (so its
        # --help works without them): a missing one is a line naming the extra, not a traceback.
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            command = ctx.invoked_subcommand
            if command is None or not exc.name or exc.name.partition(".")[0] == "divingbell":
                raise
            raise _missing_dependency(command, exc) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        lazy = [name for name, (target, _) in LAZY_COMMANDS.items()
                if importlib.util.find_spec(target.partition(":")[0]) is not None]
        return sorted({*super().list_commands(ctx), *lazy})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is not None:
                rows.append((name, command.get_short_help_str(limit=200)))
            elif name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        import importlib

        module_name, _, attr = LAZY_COMMANDS[cmd_name][0].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return None
            raise _missing_dependency(cmd_name, exc) from exc
        loaded = getattr(module, attr)
        assert isinstance(loaded, click.Command)
        return loaded


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="divingbell")
def cli() -> None:
    """Declarative host configuration for bare-metal Kubernetes nodes.

    One YAML document (Divingbell's `conf:` layout) describes every node; overrides by node
    label and hostname pick what each node gets. divingbell plans and applies it idempotently,
    keeps what it owns in its own files, and restores a setting's original value when the
    setting leaves the document.

    \b
    Typical use:
      divingbell validate site.yaml
      divingbell render site.yaml --node node1 --label role=compute
      divingbell plan site.yaml            # what would change here; touches nothing
      divingbell apply site.yaml           # converge this host
      divingbell status                    # what divingbell owns here, last outcome
    """


# The host commands (divingbell/commands/host.py) are always there; click translates their
# help texts through gettext as they are declared (see the top of this module).
from divingbell.commands.agent import agent  # noqa: E402
from divingbell.commands.host import HOST_COMMANDS  # noqa: E402

for _command in [*HOST_COMMANDS, agent]:
    cli.add_command(_command)

gettext.find = _gettext_find  # see the top of the module
