"""The code's shape: import direction between the package and the tools above it, function sizes, the
README's layout section."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "ssl_ebm"


def _imports(path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


# The scikit-learn estimator drives the whole pipeline from above (it writes shards, then trains with
# launch/train.py, which it loads by path): the one package module that reaches up.
ABOVE_THE_PIPELINE = {PACKAGE / "sklearn.py"}


def test_the_package_never_imports_the_shard_writer_or_the_launchers():
    """shards/ builds on ssl_ebm (the format, the reader); ssl_ebm must not reach back up."""
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path not in ABOVE_THE_PIPELINE
                 for name in _imports(path) if name.split(".")[0] in ("shards", "launch")]
    assert offenders == []


def test_only_the_runtime_imports_the_distributed_libraries():
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "runtime.py" for name in _imports(path)
                 if name.split(".")[0] in ("accelerate", "deepspeed") or name.startswith("torch.distributed")]
    offenders += [f"{path.relative_to(REPO)}: torch.distributed" for path in sorted(PACKAGE.rglob("*.py"))
                  if path.name != "runtime.py" and re.search(r"^[^#\"]*\btorch\.distributed\.", path.read_text(), re.M)]
    assert offenders == []


def test_functions_stay_short_and_the_training_script_reads_in_one_sitting():
    long = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "launch").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []
    assert len((REPO / "launch" / "train.py").read_text().splitlines()) <= 250


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")]
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name != "__init__.py":
            assert re.search(rf"^\s+{re.escape(path.name)}\s", layout, re.M), f"README's layout lacks ssl_ebm/{path.name}"
    named = set(re.findall(r"^  ([\w.]+\.py)\s", layout, re.M))
    missing = [name for name in named if not (PACKAGE / name).exists()]
    assert missing == [], f"README's layout names files that do not exist: {missing}"
    for path in sorted((REPO / "launch").glob("*.py")):
        assert path.name in layout, f"README's layout lacks launch/{path.name}"
