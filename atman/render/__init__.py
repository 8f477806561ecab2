"""Views of an :class:`~atman.explanation.Explanation`: rich terminal output and self-contained HTML.

>>> from atman.render import render_html, render_terminal
>>> render_terminal(exp)
>>> html = render_html(exp, title="Why Oslo?")
"""

from .html import render_fragment, render_html
from .terminal import render_terminal

__all__ = ["render_fragment", "render_html", "render_terminal"]
