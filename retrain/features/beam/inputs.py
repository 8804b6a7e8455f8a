"""The images ``retrain extract`` reads: a folder scan or a file list, listed by the launcher, or
globs (and object-store folders) matched by the workers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from apache_beam.io.filesystems import FileSystems

from ...errors import DatasetError
from .steps import read_file


@dataclass
class Inputs:
    paths: list[str] | None = None  # listed by the launcher
    patterns: list[str] | None = None  # matched by the workers
    root: str | None = None  # a folder matched by the workers: images lie in its class folders
    skipped: list[dict] = field(default_factory=list)


def has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_inputs(source: str) -> Inputs:
    """``source`` is a folder of class sub-folders, a glob, or a text file listing images (one path or
    URL a line; relative ones are relative to the list's folder; blank lines and ``#`` lines ignored)."""
    source = str(source)
    if has_glob(source):
        return Inputs(patterns=[source])
    if FileSystems.get_scheme(source) is None:
        return _list_local(Path(source).expanduser())
    if FileSystems.exists(source):
        return _filtered(_read_list(source, read_file(source).decode("utf-8")))
    return Inputs(patterns=[FileSystems.join(source.rstrip("/"), "**")], root=source.rstrip("/"))


def _list_local(path: Path) -> Inputs:
    from ...data.dataset import _is_ignored, _walk_files, list_classes
    from ...data.images import IMAGE_EXTENSIONS

    if not path.exists():
        raise DatasetError(f"images {path} do not exist (expected a folder of class sub-folders, a glob or a file list)")
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return Inputs(paths=[str(path.absolute())])
        return _filtered(_read_list(str(path.absolute()), path.read_text(encoding="utf-8")))
    classes = list_classes(path)
    if not classes:
        raise DatasetError(f"image folder {path} has no class sub-folders: expected {path}/<class>/<images>")
    inputs = Inputs(paths=[])
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=True) and not _is_ignored(entry.name):
            inputs.skipped.append({"path": str(Path(entry.path).absolute()), "reason": "not inside a class folder"})
    found = [file.absolute() for name in classes for file in _walk_files(path / name)]
    return _filtered([str(p) for p in found], inputs)


def _read_list(list_path: str, text: str) -> list[str]:
    base = FileSystems.split(list_path)[0]
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if FileSystems.get_scheme(line) is None and not os.path.isabs(os.path.expanduser(line)):
            line = FileSystems.join(base, line) if FileSystems.get_scheme(base) else str(Path(base) / line)
        paths.append(os.path.expanduser(line) if FileSystems.get_scheme(line) is None else line)
    return paths


def _filtered(paths: list[str], inputs: Inputs | None = None) -> Inputs:
    from ...data.images import IMAGE_EXTENSIONS

    inputs = inputs or Inputs(paths=[])
    for path in paths:
        suffix = os.path.splitext(path)[1]
        if suffix.lower() in IMAGE_EXTENSIONS:
            inputs.paths.append(path)
        else:
            inputs.skipped.append({"path": path, "reason": f"not an image file extension ({suffix or 'none'})"})
    return inputs
