"""The alphawatch web dashboard: static files that read only the public REST API."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Folder served at ``/static``; ``index.html`` there is the page served at ``/``."""
