"""What the tool may write over or delete: only what it wrote itself.

Three rules, each checked before any work (and again just before anything is deleted):

1. **An output folder is replaced only when it is empty or holds an earlier output of the same
   kind**, recognised by the marker file the tool writes there (``run.json`` with
   ``"tool": "retrain"`` for a model, ``report.json`` for a report, ``retrain-module.json`` for an
   exported module) and holding no file the tool did not write (the marker lists them; older
   outputs are matched by the names the tool writes). Any other non-empty folder is refused,
   ``--overwrite`` or not.
2. **Outputs never overlap inputs**: a folder the tool writes is not, does not contain and does
   not lie inside a folder it reads (images, validation and test folders, the module) or the
   cache, compared after resolving symbolic links and ``..`` (and by inode, for bind mounts).
3. **The cache deletes only cache entries**: a cache folder carries a ``CACHEDIR.TAG`` (the Cache
   Directory Tagging convention, which also tells backup tools to skip it); a folder without one
   is used only when it is empty or every entry in it has the cache's layout (it then gets the
   tag), and clearing touches only files with the cache's own names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

# --- rule 1: output folders ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """One kind of folder the tool writes: how it is recognised and which names it holds."""

    name: str  # "model", "report"
    marker: str  # the file whose content says the folder is ours
    role: str  # how messages name the folder: "output folder", "report folder"
    names: tuple[str, ...]  # top-level names (glob patterns) of a folder written before manifests
    trees: tuple[str, ...] = ()  # top-level folders whose whole content the tool wrote (older folders)

    def owns(self, marker_data: object) -> bool:
        if not isinstance(marker_data, dict):
            return False
        if self.name == "report" and "tool" not in marker_data:  # reports written before the marker had a tool field
            return "confusion_matrix" in marker_data and "mistakes" in marker_data
        return marker_data.get("tool") == "retrain" and marker_data.get("output_kind", "model") == self.name


MODEL = OutputKind(
    "model", "run.json", "output folder",
    names=("run.json", "metrics.json", "labels.txt", "README.md", "model.tflite", "model_*.tflite", "saved_model",
           "label_errors.html", "label_errors"),
    trees=("saved_model", "label_errors"),
)
REPORT = OutputKind(
    "report", "report.json", "report folder",
    names=("index.html", "report.json", "confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "mistakes"),
    trees=("mistakes",),
)
MODULE = OutputKind(  # ``retrain module export``: a reusable feature-vector module (serving/publish.py)
    "module", "retrain-module.json", "module folder",
    names=("retrain-module.json", "README.md", "model-metadata.json", "saved_model.pb", "fingerprint.pb",
           "variables", "assets"),
    trees=("variables", "assets"),
)

STAGE_MARK = ".retrain-stage"  # inside every staging folder: only such folders are cleaned up as leftovers


def files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file and link under ``folder`` (links are not followed)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        found += [(base / name).relative_to(folder).as_posix() for name in files]
        found += [(base / name).relative_to(folder).as_posix() for name in dirs if (base / name).is_symlink()]
    return sorted(found)


def manifest(folder: Path, kind: OutputKind) -> list[str]:
    """What to record in the marker: every file in ``folder`` (the staging folder), the marker too."""
    return sorted((set(files_under(folder)) - {STAGE_MARK}) | {kind.marker})


def _read_marker(folder: Path, kind: OutputKind):
    try:
        return json.loads((folder / kind.marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def written_by_tool(relative: str, kind: OutputKind, marker_data: dict) -> bool:
    """Whether the file ``relative`` (a POSIX path inside an output of ``kind``) is one the tool wrote:
    listed in the marker's manifest, or (outputs from before manifests) one of the kind's names."""
    listed = marker_data.get("files")
    if isinstance(listed, list):
        return relative in listed
    from fnmatch import fnmatchcase

    top, _, rest = relative.partition("/")
    if rest:
        return top in kind.trees
    return any(fnmatchcase(top, pattern) for pattern in kind.names)


def _foreign_files(folder: Path, kind: OutputKind, marker_data: dict) -> list[str]:
    """Files in an earlier output that the tool did not write there."""
    return [path for path in files_under(folder) if not written_by_tool(path, kind, marker_data)]


def why_not_replaceable(folder: Path, kind: OutputKind) -> str | None:
    """None when ``folder`` (an existing folder) may be replaced by an output of ``kind``, else why not."""
    if not any(folder.iterdir()):
        return None
    marker_data = _read_marker(folder, kind)
    if not kind.owns(marker_data):
        example = files_under(folder)[:1] or sorted(p.name for p in folder.iterdir())[:1]
        return (f"{kind.role} {folder} is not empty and holds no earlier retrain {kind.name} "
                f"(e.g. {example[0]}): retrain never replaces it, even with --overwrite; "
                f"choose a new or empty folder")
    foreign = _foreign_files(folder, kind, marker_data)
    if foreign:
        return (f"{kind.role} {folder} holds an earlier {kind.name} and {len(foreign)} file(s) retrain did not "
                f"write (e.g. {foreign[0]}): move them out or choose another folder")
    return None


def check_output_folder(target: Path, kind: OutputKind, overwrite: bool) -> None:
    """Refuse ``target`` unless it is new, empty, or (with ``overwrite``) an earlier output of ``kind``."""
    if target.is_symlink() and not target.exists():
        raise OutputError(f"{kind.role} {target} is a broken symbolic link: remove it or choose another folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{kind.role} {target} exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    problem = why_not_replaceable(target, kind)
    if problem:
        raise OutputError(problem)
    if not overwrite:
        raise OutputError(f"{kind.role} {target} holds an earlier {kind.name}: pass --overwrite to replace it")


# --- rule 2: outputs apart from inputs -----------------------------------------------------------


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies inside it (by path, or by inode for existing folders)."""
    return any(_same(candidate, outer) for candidate in (inner, *inner.parents))


def overlap(written: Path, read: Path) -> str | None:
    """How ``written`` overlaps ``read`` ("is", "lies inside", "contains"), or None."""
    a, b = _resolved(written), _resolved(read)
    if _same(a, b):
        return "is"
    if _within(a, b):
        return "lies inside"
    if _within(b, a):
        return "contains"
    return None


def check_apart(writes: Mapping[str, str | os.PathLike | None], reads: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse when a folder the tool writes is, contains or lies inside one it reads (or another it writes).

    ``writes`` and ``reads`` map a role ("output folder", "image folder", ...) to a path (None: not used).
    """
    writes = {role: path for role, path in writes.items() if path is not None}
    reads = {role: path for role, path in reads.items() if path is not None}
    pairs = [(w, r) for w in writes for r in reads]
    names = list(writes)
    pairs += [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    for w_role, r_role in pairs:
        w_path = writes[w_role]
        r_path = reads.get(r_role, writes.get(r_role))
        how = overlap(w_path, r_path)
        if how:
            raise OutputError(f"the {w_role} {w_path} {how} the {r_role} {r_path}: "
                              f"retrain never writes where it reads; choose another {w_role}")


# --- rule 3: the cache folder --------------------------------------------------------------------

CACHEDIR_TAG = "CACHEDIR.TAG"
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
TAG_TEXT = (f"{TAG_SIGNATURE}\n"
            "# This file is a cache directory tag created by retrain (bottleneck cache).\n"
            "# For information about cache directory tags, see https://bford.info/cachedir/\n")
MODULE_RECORDS = "modules.json"

# The cache's own names: entry folders <module fingerprint[:16]>-<preprocessing key>[-aug<key>],
# shards <checksum[:32]>.npz, each shard's key file <checksum[:32]>.keys, the compacted index
# index.bin, their temporary files, damaged shards set aside, and the records file.
ENTRY_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{12}(-aug[0-9a-f]{12})?")
SHARD_NAME = re.compile(r"[0-9a-f]{32}\.npz")
SHARD_KEYS_NAME = re.compile(r"[0-9a-f]{32}\.keys")
INDEX_NAME = re.compile(r"index\.bin")
TEMPORARY_SHARD = re.compile(r"\.tmp-\d+-[0-9a-f]{32}\.(npz|keys|bin)")
SET_ASIDE_SHARD = re.compile(r"\.corrupt-[0-9a-f]{32}-[0-9a-f]{8}")
TOP_FILES = re.compile(rf"{re.escape(CACHEDIR_TAG)}|{re.escape(MODULE_RECORDS)}|\.{re.escape(MODULE_RECORDS)}\.[0-9a-f]{{8}}"
                       rf"|\.{re.escape(CACHEDIR_TAG)}\.[0-9a-f]{{8}}")
ENTRY_FILES = (SHARD_NAME, SHARD_KEYS_NAME, INDEX_NAME, TEMPORARY_SHARD, SET_ASIDE_SHARD)
# Modules converted for LiteRT extraction (features/lite.py): CACHE/litert/<fingerprint[:16]>-<preprocessing
# key>.tflite, and write_atomic's temporary sibling of one (a killed conversion leaves it behind).
CONVERTED_DIR = "litert"
CONVERTED_MODULE = re.compile(r"[0-9a-f]{16}-[0-9a-f]{12}\.tflite")
CONVERTED_TEMPORARY = re.compile(r"\.[0-9a-f]{16}-[0-9a-f]{12}\.tflite\.[0-9a-f]{8}")
CONVERTED_FILES = (CONVERTED_MODULE, CONVERTED_TEMPORARY)
# Modules' slim copies (features/slim.py): CACHE/slim/<fingerprint[:16]>-<uuid>/ (a SavedModel), and
# the records naming them, <fingerprint[:32]>.json (before version 3: <fingerprint[:32]>-<image size or
# native>.json), with write_atomic's temporaries.
SLIM_DIR = "slim"
SLIM_COPY = re.compile(r"[0-9a-f]{16}-[0-9a-f]{32}")
SLIM_RECORD = re.compile(r"[0-9a-f]{32}(-(native|\d+))?\.json")
SLIM_RECORD_TEMPORARY = re.compile(r"\.[0-9a-f]{32}(-(native|\d+))?\.json\.[0-9a-f]{8}")
SAVED_MODEL_NAMES = {"saved_model.pb", "fingerprint.pb", "variables", "assets"}


def _slim_stray(folder: Path) -> str | None:
    """The first thing in the slim folder that features/slim.py would not have written, or None."""
    for inner in sorted(folder.iterdir()):
        if inner.is_symlink():
            return inner.name
        if inner.is_dir() and SLIM_COPY.fullmatch(inner.name):
            stray = next((c.name for c in sorted(inner.iterdir()) if c.name not in SAVED_MODEL_NAMES), None)
            if stray is not None:
                return f"{inner.name}/{stray}"
        elif not (inner.is_file() and (SLIM_RECORD.fullmatch(inner.name) or SLIM_RECORD_TEMPORARY.fullmatch(inner.name))):
            return inner.name
    return None


def is_entry_file(path: Path, kinds=ENTRY_FILES) -> bool:
    return path.is_file() and not path.is_symlink() and any(p.fullmatch(path.name) for p in kinds)


def converted_dir(root: Path) -> Path | None:
    """The cache's folder of converted modules, when it is there (a link is not it)."""
    folder = root / CONVERTED_DIR
    return folder if folder.is_dir() and not folder.is_symlink() else None


def cache_entries(root: Path) -> list[Path]:
    """The cache's entry folders (by name; links are not entries)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if ENTRY_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _tag_state(root: Path) -> str:
    try:
        text = (root / CACHEDIR_TAG).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "none"
    except OSError:
        return "foreign"
    return "ours" if text.startswith(TAG_SIGNATURE) and "retrain" in text else "foreign"


def _not_cache_shaped(root: Path) -> str | None:
    """The first thing in ``root`` that the cache would not have written there, or None."""
    for path in sorted(root.iterdir()):
        if path.is_symlink():
            return path.name
        if path.is_dir() and path.name == SLIM_DIR:
            stray = _slim_stray(path)
            if stray is not None:
                return f"{path.name}/{stray}"
        elif path.is_dir() and (ENTRY_NAME.fullmatch(path.name) or path.name == CONVERTED_DIR):
            kinds = CONVERTED_FILES if path.name == CONVERTED_DIR else ENTRY_FILES
            for inner in sorted(path.iterdir()):
                if not is_entry_file(inner, kinds):
                    return f"{path.name}/{inner.name}"
        elif not (path.is_file() and TOP_FILES.fullmatch(path.name)):
            return path.name
    return None


def why_not_cache(root: Path) -> str | None:
    """None when ``root`` may be used (and cleared) as a retrain cache, else why not."""
    if root.exists() and not root.is_dir():
        return f"cache folder {root} exists and is not a folder"
    if not root.is_dir():
        return None
    state = _tag_state(root)
    if state == "ours":
        return None
    if state == "foreign":
        return (f"cache folder {root} is another program's cache (its {CACHEDIR_TAG} is not retrain's): "
                "choose a new or empty folder")
    stray = _not_cache_shaped(root)
    if stray is not None:
        return (f"cache folder {root} is not a retrain cache (no {CACHEDIR_TAG}, and it holds {stray}): "
                "choose a new or empty folder, or leave --cache-dir out")
    return None


def check_cache_folder(root: str | os.PathLike) -> Path:
    root = Path(os.path.expanduser(os.fspath(root)))
    problem = why_not_cache(root)
    if problem:
        raise OutputError(problem)
    return root


def ensure_cache(root: str | os.PathLike) -> Path:
    """Make ``root`` a tagged retrain cache (creating it, or tagging an untagged one with the cache's
    layout) before anything is written there; refuse any other folder."""
    from .files import write_atomic

    root = check_cache_folder(root)
    if _tag_state(root) != "ours":
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / CACHEDIR_TAG, TAG_TEXT)
    return root


def remove_entry_files(entry: Path, files: Iterable[Path] | None = None, kinds=ENTRY_FILES) -> int:
    """Delete the cache's own files in one entry folder (all, or ``files``), then the folder if empty.
    ``kinds``: the names that folder's files have (``CONVERTED_FILES`` in the converted modules' folder)."""
    removed = 0
    for path in (sorted(entry.iterdir()) if files is None else files):
        if path.parent == entry and is_entry_file(path, kinds):
            path.unlink(missing_ok=True)
            removed += 1
    if files is None:
        try:
            entry.rmdir()  # only when nothing else is left in it
        except OSError:
            pass
    return removed


def clear_converted(root: Path) -> int:
    """Delete the converted modules (and their leftover temporaries) in a cache; returns how many."""
    folder = converted_dir(root)
    return 0 if folder is None else remove_entry_files(folder, kinds=CONVERTED_FILES)


__all__ = [
    "MODEL", "REPORT", "MODULE", "OutputKind", "STAGE_MARK", "check_output_folder", "why_not_replaceable", "manifest",
    "files_under", "written_by_tool", "check_apart", "overlap", "CACHEDIR_TAG", "check_cache_folder", "ensure_cache", "why_not_cache",
    "cache_entries", "remove_entry_files", "is_entry_file", "TEMPORARY_SHARD", "SHARD_NAME", "SHARD_KEYS_NAME",
    "INDEX_NAME", "CONVERTED_DIR", "CONVERTED_FILES",
    "converted_dir", "clear_converted",
]
