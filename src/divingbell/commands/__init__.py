"""Command groups of the `divingbell` CLI, one file each, loaded lazily by `divingbell.cli`.

Each file parses options, calls into its subpackage and prints; no logic lives here.
"""
