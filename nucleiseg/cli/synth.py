"""Commands of this area register on the shared app."""

from __future__ import annotations

from nucleiseg.cli.app import app  # noqa: F401
