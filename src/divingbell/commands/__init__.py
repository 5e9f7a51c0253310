"""The `divingbell` CLI, thin: parsing and printing, the work is in the subpackages.

`entry.py` is the console script (`apply`'s plain forms run `apply.py` without click), `cli.py`
the click group, `console.py` and `output.py` what the commands share (one-line errors, JSON,
exit codes, plans as text). Each other command group is one file here, loaded lazily by `cli.py`.
"""
