"""The project's files stand on their own: none cites a document that is not in the
repository. The op contracts are docs/ops.md, the count rules docs/index.md."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Working notes and CI scripts are not the project's documentation.
NOT_PROJECT = (".ci/", ".scratch/")
# Built from two literals so that this file does not match itself.
OUTSIDE_DOCUMENT = "DESIGN" + ".md"


def tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return [name for name in listing.decode().split("\0") if name and not name.startswith(NOT_PROJECT)]


def test_no_tracked_file_cites_a_document_outside_the_repository():
    files = tracked_files()
    assert "docs/ops.md" in files and "docs/index.md" in files, "the listing missed the docs"
    citing = [
        name
        for name in files
        if (ROOT / name).is_file() and OUTSIDE_DOCUMENT.encode() in (ROOT / name).read_bytes()
    ]
    assert citing == [], f"{OUTSIDE_DOCUMENT} is not in the repository; cite docs/ops.md or docs/index.md in {citing}"
