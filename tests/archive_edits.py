"""Rewriting a saved archive's members in tests (tampered or edited files for the loaders to meet)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    """Write ``target``: the members of ``source`` with ``replace``'s in their place, then ``extra``'s added."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members.update(replace)
    members.update(extra or {})
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target
