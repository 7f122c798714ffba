"""The HTTP API (FastAPI): accounts, contacts, groups, history. See :func:`im.api.app.create_app`."""

from im.api.app import create_app

__all__ = ["create_app"]
