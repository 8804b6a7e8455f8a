"""Writing files and folders so that a reader never sees a half-written one, and deleting only
what the tool wrote (the rules are in safety.py)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .safety import STAGE_MARK, OutputKind, why_not_replaceable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_stage(target: Path) -> Path:
    """Create the hidden folder ``.<name>.partial-<pid>-<id>`` beside ``target`` to write into.

    The folder gets its staging mark before it takes that name (it is made as ``.staging-...``
    and renamed), so a run killed at any moment leaves either a marked ``.partial-`` folder or
    an unmarked ``.staging-`` one holding nothing but the mark. Leftovers of processes that no
    longer run are removed first: marked folders with those names, and empty ``.staging-`` ones;
    nothing else is ever taken for one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("partial", "staging"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = leftover.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if not (pid.isdigit() and not _alive(int(pid)) and leftover.is_dir() and not leftover.is_symlink()):
                continue
            if (leftover / STAGE_MARK).is_file():
                shutil.rmtree(leftover, ignore_errors=True)
            elif kind == "staging" and not any(leftover.iterdir()):
                leftover.rmdir()
    name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    making = target.parent / f".{target.name}.staging-{name}"
    making.mkdir()
    (making / STAGE_MARK).write_text("staging folder of a running retrain command\n")
    stage = target.parent / f".{target.name}.partial-{name}"
    os.replace(making, stage)  # a new, unique name: nothing is there to be replaced
    return stage


def remove_stage(stage: Path) -> None:
    """Delete a staging folder made by ``make_stage`` (and nothing else)."""
    if stage.is_dir() and not stage.is_symlink() and (stage / STAGE_MARK).is_file():
        shutil.rmtree(stage, ignore_errors=True)


def replace_dir(stage: Path, target: Path, kind: OutputKind) -> None:
    """Move the complete folder ``stage`` to ``target``, replacing an earlier output of ``kind``
    there (checked again now, just before it goes). If the final move fails, the previous
    ``target`` is put back."""
    (stage / STAGE_MARK).unlink(missing_ok=True)
    old = None
    if target.is_symlink():
        raise OutputError(f"{kind.role} {target} is a symbolic link: give the folder it points to")
    if target.exists():
        problem = why_not_replaceable(target, kind) if target.is_dir() else f"{kind.role} {target} is not a folder"
        if problem:
            raise OutputError(problem)
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(target: Path, kind: OutputKind) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; when the block ends without an error, move it
    to ``target`` (replacing an earlier output of ``kind``), else delete it. Readers never see
    a half-written folder, and a failure keeps the previous one."""
    stage = make_stage(target)
    try:
        yield stage
        replace_dir(stage, target, kind)
    except BaseException:
        remove_stage(stage)
        raise


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to a temporary sibling, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(text, bytes):
            temporary.write_bytes(text)
        else:
            temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
