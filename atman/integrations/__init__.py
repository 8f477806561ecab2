"""Bridges from atman to the tools researchers already use: inseq, Captum and pandas.

Each bridge lives in its own module and imports its library only when the module is imported, so
the core of atman never needs them. ``Explanation.to_captum()`` and ``Explanation.to_frame()`` are
the Captum and pandas bridges for single explanations; this package holds the rest:

- :mod:`atman.integrations.inseq`: ``import atman.integrations.inseq`` registers the ``"atman"``
  method with inseq (``pip install "atman[inseq]"`` cannot install inseq itself, see docs/usage.md).
- :mod:`atman.integrations.pandas`: evaluation and baseline-comparison records as DataFrames.
- :mod:`atman.integrations.langchain` and :mod:`atman.integrations.llamaindex`: cited answers for
  LangChain chains and LlamaIndex responses (``pip install "atman[langchain]"`` / ``"atman[llamaindex]"``).
"""

from ..errors import MISSING, missing

__all__ = ["MISSING", "missing"]
