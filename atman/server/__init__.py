"""HTTP server: AtMan explanations and steering in the JSON of Aleph Alpha's API, and a web page.

Needs the ``server`` extra (``pip install 'atman[server]'``). Start it with ``atman serve``, or
build the app with :func:`create_app` and run it with any ASGI server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .base import Limits

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    # imported on first use, so that ``atman`` and its CLI work without the server extra
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Limits":
        from .base import Limits

        return Limits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
