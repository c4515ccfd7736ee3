"""The checkout itself: no tracked file holds what an unfinished merge leaves behind."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import REPO

# Git's conflict markers, each at the start of a line: "<<<<<<< ours", a line of exactly seven '=' and
# nothing else, and ">>>>>>> theirs".
CONFLICT_MARKER = re.compile(rb"^(?:<{7} |={7}\r?$|>{7} )", re.M)


def test_no_tracked_file_holds_merge_conflict_markers():
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout, or git is missing ({e}): nothing to list")
    names = [n.decode() for n in listing.split(b"\0") if n]
    assert names, "git ls-files listed nothing"
    found = []
    for name in names:
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, archives): no text lines to hold markers
            continue
        for m in CONFLICT_MARKER.finditer(data):
            line = data.count(b"\n", 0, m.start()) + 1
            found.append(f"{name}:{line}: {m.group().decode().strip()}")
    assert found == [], "merge conflict markers left in tracked files:\n" + "\n".join(found)
