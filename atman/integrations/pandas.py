"""Evaluation records and method comparisons as pandas DataFrames (pandas is optional: ``atman[pandas]``).

Example::

    >>> from atman.integrations.pandas import read_records
    >>> df = read_records("docs/results/evaluation-smollm2.records.jsonl")
    >>> df.groupby(["dataset", "method"])[["ap", "top1"]].mean()
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..explanation import PANDAS_INSTALL, Explanation
from . import missing

try:
    import pandas as pd
except ImportError as exc:
    raise missing("pandas", PANDAS_INSTALL) from exc

RECORD_SUFFIX = ".records.jsonl"
METRICS_PREFIX = "metrics."


def read_records(source: str | Path | Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Records of ``atman evaluate`` as a DataFrame: one row per dataset, granularity, example and method.

    ``source`` is a ``*.records.jsonl`` file (one record per line, as ``atman evaluate`` writes
    them while it runs), a result ``.json`` (its ``records``), a folder (all ``*.records.jsonl`` in
    it), a glob pattern, or the records themselves (dicts, e.g. ``atman.evaluate.suite`` output).
    Each metric becomes a column of its own (``ap``, ``top1``, ``aopc_morf``, ...). With several
    files a ``run`` column names the file each row came from (its name without ``.records.jsonl``).

    Example::

        >>> df = read_records("docs/results")
        >>> df.pivot_table(index="method", columns="run", values="ap")
    """
    if isinstance(source, (str, Path)):
        pattern = str(source)
        is_pattern = any(char in pattern for char in "*?[")
        files = sorted(map(Path, glob.glob(pattern))) if is_pattern else _record_files(Path(source))
        if not files:
            raise FileNotFoundError(f"no evaluation records at {source}")
        frames = []
        for path in files:
            frame = _frame(_load(path))
            if len(files) > 1:
                frame.insert(0, "run", _run_name(path))
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)
    return _frame(list(source))


def comparison_frame(explanations: Mapping[str, Explanation] | Iterable[Explanation]) -> pd.DataFrame:
    """Several explanations of one input (AtMan and :mod:`atman.baselines` methods) as one long DataFrame.

    The rows of each :meth:`Explanation.to_frame`, one after the other; ``method`` is the mapping's
    key when given a mapping, else the method recorded in the explanation.

    Example::

        >>> from atman.baselines import get_method
        >>> runs = {name: get_method(name, lm).attribute(prompt, " Oslo", granularity="sentence")
        ...         for name in ("atman", "integrated-gradients")}
        >>> comparison_frame(runs).pivot_table(index="text", columns="method", values="score")
    """
    items = explanations.items() if isinstance(explanations, Mapping) else ((None, e) for e in explanations)
    frames = []
    for name, explanation in items:
        frame = explanation.to_frame()
        if name is not None:
            frame["method"] = name
        frames.append(frame)
    if not frames:
        raise ValueError("no explanations to compare")
    return pd.concat(frames, ignore_index=True)


def _record_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob(f"*{RECORD_SUFFIX}"))
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return [path]


def _run_name(path: Path) -> str:
    name = path.name
    return name[: -len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else path.stem


def _load(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or "records" not in data:
            raise ValueError(f"{path} is not an evaluation result (it has no 'records')")
        return list(data["records"])
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        if not (isinstance(record, dict) and set(record) == {"environment"}):   # the log's header line
            records.append(record)
    return records


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "method" not in record:
            raise ValueError(f"record {index} is not an evaluation record (a dict with a 'method')")
    frame = pd.json_normalize(records)
    return frame.rename(columns={c: c[len(METRICS_PREFIX):] for c in frame.columns if c.startswith(METRICS_PREFIX)})
