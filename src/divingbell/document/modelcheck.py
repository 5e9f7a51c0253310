"""Kept only until bootstrap/design.py imports `check_model` from `document.problems`, where
every format's problems are reported now; delete it then."""

from divingbell.document.problems import check_model as check_model  # noqa: PLC0414
