"""Who may import whom: the core never imports agents, bayes or envs; only the CLI entry
point (``ngrl/train.py``) sits on top, with one import."""

from __future__ import annotations

import ast
from pathlib import Path

import ngrl

CORE = Path(ngrl.__file__).parent
UPPER = ("agents", "bayes", "envs")


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_imports_no_package_above_it() -> None:
    offenders = {
        str(path.relative_to(CORE)): sorted(imported_packages(path) & set(UPPER))
        for path in CORE.rglob("*.py")
        if path.name != "train.py"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_cli_entry_point_is_one_import_of_the_agents() -> None:
    tree = ast.parse((CORE / "train.py").read_text())
    upward = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UPPER
    ]
    assert [(node.module, [a.name for a in node.names]) for node in upward] == [
        ("agents.run", ["main"])
    ]


def test_the_bayes_library_does_not_import_its_evaluation_protocol() -> None:
    import bayes

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
        assert not {m for m in modules if m.startswith("bayes.evaluation")}, path
