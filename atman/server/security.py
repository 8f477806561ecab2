"""Checks of the server's security settings, shared by :func:`atman.server.create_app` and ``atman serve``.

Nothing here imports the web framework, so that ``atman serve`` can check its options before the
server extra (or a model) loads.
"""

from __future__ import annotations

import ipaddress


def token_problem(token: str) -> str | None:
    """Why no client could send ``token`` in an ``Authorization: Bearer`` header, or None when one can.

    >>> token_problem("s3cret") is None, token_problem("  ")
    (True, 'is only whitespace')
    """
    if not token:
        return "is empty"
    if not token.strip():
        return "is only whitespace"
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        return "holds whitespace or characters outside printable ASCII"
    return None


def is_loopback(host: str) -> bool:
    """Is ``host`` reachable from this machine only?

    >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
    (True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
