"""Who may import whom: the core never imports agents, bayes or envs; only the CLI entry
point (``ngrl/train.py``) sits on top, with one import."""

from __future__ import annotations

import ast
from pathlib import Path

import ngrl

CORE = Path(ngrl.__file__).parent
UPPER = ("ngrl.agents", "ngrl.bayes", "ngrl.envs")


def upper(module: str) -> str | None:
    """The package above the core that ``module`` belongs to, if any."""
    return next((p for p in UPPER if module == p or module.startswith(p + ".")), None)


def imported_packages(path: Path) -> set[str]:
    """The packages above the core that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {found for name in names if (found := upper(name))}


def test_the_core_imports_no_package_above_it() -> None:
    offenders = {
        str(path.relative_to(CORE)): sorted(imported_packages(path))
        for path in CORE.rglob("*.py")
        if path.name != "train.py"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_cli_entry_point_is_one_import_of_the_agents() -> None:
    tree = ast.parse((CORE / "train.py").read_text())
    upward = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and upper(node.module or "")
    ]
    assert [(node.module, [a.name for a in node.names]) for node in upward] == [
        ("ngrl.agents.run", ["main"])
    ]


def test_the_bayes_library_does_not_import_its_evaluation_protocol() -> None:
    import ngrl.bayes as bayes

    root = Path(bayes.__file__).parent
    library = [path for path in root.rglob("*.py") if "evaluation" not in path.parts]
    assert library
    for path in library:
        tree = ast.parse(path.read_text())
        modules = {
            node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level
        }
        assert not {m for m in modules if m.startswith("ngrl.bayes.evaluation")}, path
