"""HTTP server: AtMan explanations and steering in the JSON of Aleph Alpha's API, and a web page.

Needs the ``server`` extra (``pip install atman[server]``). Start it with ``atman serve``.
"""

from .app import create_app
from .service import Limits

__all__ = ["Limits", "create_app"]
