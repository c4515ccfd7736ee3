"""The Dockerfile, read rather than built (no Docker here): what it copies exists, and it installs and
starts the package exactly as README.md says."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import tomllib
from packaging.specifiers import SpecifierSet

from conftest import REPO

README = (REPO / "README.md").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        lines.append(current)
        current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def args() -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)


def expand(text: str) -> str:
    values = args()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def pip_installs() -> list[str]:
    """Every `pip install ...` command of the RUN lines, build arguments filled in."""
    found = []
    for op, arg in instructions():
        if op == "RUN":
            found += [cmd.strip() for cmd in expand(arg).split("&&") if cmd.strip().startswith("pip install")]
    return found


def test_base_image_is_cuda_and_versions_are_pinned():
    base = expand(next(a for op, a in instructions() if op == "FROM"))
    assert base.startswith("nvidia/cuda:") and "devel" in base, base
    pins = dict(re.findall(r'"(torch|deepspeed)==([\w.]+)"', " ".join(pip_installs())))
    assert set(pins) == {"torch", "deepspeed"}, pip_installs()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_spec = next(d for d in project["dependencies"] if d.startswith("torch"))[len("torch"):]
    ds_spec = next(d for d in project["optional-dependencies"]["deepspeed"] if d.startswith("deepspeed"))[len("deepspeed"):]
    assert pins["torch"] in SpecifierSet(torch_spec), f"torch {pins['torch']} outside pyproject's {torch_spec}"
    assert pins["deepspeed"] in SpecifierSet(ds_spec)


def test_every_copied_path_exists_and_is_not_ignored():
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    copies = [a for op, a in instructions() if op == "COPY"]
    assert copies
    for arg in copies:
        *sources, _dest = shlex.split(arg)
        for src in sources:
            assert not src.startswith("--"), f"COPY {arg}: copy from the build context only"
            path = REPO / src
            assert path.exists(), f"Dockerfile copies {src}, which does not exist"
            rel = path.relative_to(REPO).as_posix()
            assert not any(fnmatch.fnmatch(rel, pat.rstrip("/")) for pat in ignored), f"{src} is in .dockerignore"
    # the package is installed from what was copied: pyproject and the packages it lists
    copied = {shlex.split(a)[0].rstrip("/") for a in copies} | {s for a in copies for s in shlex.split(a)[:-1]}
    for needed in ("pyproject.toml", "README.md", "ssl_ebm", "shards", "launch", "configs"):
        assert needed in copied, f"the image needs {needed}"


def test_install_commands_are_the_readmes():
    installs = pip_installs()
    assert any("-e" in shlex.split(cmd) for cmd in installs), "the package is installed editable, as README.md does"
    for cmd in installs:
        assert cmd in README, f"Dockerfile runs `{cmd}`, which README.md does not show"


def test_entry_is_the_documented_accelerate_launch():
    cmd = json.loads(next(a for op, a in instructions() if op == "CMD"))
    assert cmd[:3] == ["accelerate", "launch", "launch/train.py"]
    assert (REPO / cmd[4]).exists() if len(cmd) > 4 else True
    assert " ".join(cmd) in README
    assert not any(op == "ENTRYPOINT" for op, _ in instructions()), "a plain CMD: `docker run IMAGE <command>` replaces it"
