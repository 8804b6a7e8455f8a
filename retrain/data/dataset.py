"""Scan an image folder, validate it, and split it stably.

Layout: ``IMAGE_DIR/<class>/<images>``. Images in sub-folders of a class folder belong to that
class. Classes are sorted by name; that order is the order of ``labels.txt``.

The split follows the old retrain.py: a file goes to train / validation / test by a SHA-1 of
its path inside the class folder (with anything from ``_nohash_`` on removed, so photos of one
subject stay together), so adding photos never moves old ones. Identical content is kept in one
split (the split of its first copy), so the test accuracy is honest, and counted once per class.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS, probe_image

IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "icon\r"}
_MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1  # as in retrain.py, so splits match its buckets
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ImageFile:
    path: str  # as found (absolute)
    label: int
    relpath: str  # inside its class folder, '/'-separated
    content_hash: str  # sha256 of the file's bytes
    decoder: str  # "tf" or "pillow", see images.probe_image


@dataclass
class Scan:
    root: str
    classes: list[str]
    images: list[ImageFile]
    skipped: list[dict] = field(default_factory=list)  # {path, reason}
    warnings: list[str] = field(default_factory=list)


@dataclass
class Split:
    classes: list[str]
    train: list[ImageFile]
    validation: list[ImageFile]
    test: list[ImageFile]
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {name: len(getattr(self, name)) for name in SPLITS}

    def counts_per_class(self) -> dict:
        table = {}
        for index, name in enumerate(self.classes):
            table[name] = {split: sum(1 for f in getattr(self, split) if f.label == index) for split in SPLITS}
        return table


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES or name.startswith("._")


def _walk_files(folder: Path) -> list[Path]:
    """All files under ``folder``, sorted; symlinks followed once (no loops)."""
    found: list[Path] = []
    visited: set[str] = set()

    def visit(directory: Path):
        real = os.path.realpath(directory)
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if _is_ignored(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                visit(path)
            elif entry.is_file(follow_symlinks=True):
                found.append(path)

    visit(folder)
    return found


def _hash_file(path: Path) -> tuple[str, bytes]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), data


def list_classes(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not _is_ignored(e.name))


SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


def _refuse_split_folders(root: Path, names: list[str], role: str) -> None:
    """``root/train/<class>/...`` given instead of ``root/train``: every image would be labelled by split."""
    if len(names) < 2 or any(n.lower() not in SPLIT_FOLDER_NAMES for n in names):
        return
    if not all(any(e.is_dir() for e in os.scandir(root / n)) for n in names):
        return
    train = next((n for n in names if n.lower() in ("train", "training")), names[0])
    others = [n for n in names if n != train]
    hint = " ".join(
        f"--{'test' if n.lower().startswith('test') else 'validation'}-dir {root / n}" for n in others
    )
    raise DatasetError(
        f"{role} {root} holds split folders ({', '.join(names)}), not class folders: "
        f"pass {root / train} as the image folder and {hint}"
    )


def scan_folder(image_dir: str | os.PathLike, classes: list[str] | None = None, role: str = "image folder") -> Scan:
    """Find the labelled images under ``image_dir``.

    With ``classes`` given (an explicit validation or test folder), its class folders must be
    among them and labels follow their order.
    """
    root = Path(image_dir).expanduser()
    if not root.exists():
        raise DatasetError(f"{role} {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{role} {root} is not a folder")
    found_classes = list_classes(root)
    if not found_classes:
        raise DatasetError(f"{role} {root} has no class sub-folders: expected {root}/<class>/<images>")
    if classes is None:
        _refuse_split_folders(root, found_classes, role)
        classes = found_classes
    else:
        unknown = [c for c in found_classes if c not in classes]
        if unknown:
            raise DatasetError(f"{role} {root} has classes the training folder lacks: {', '.join(unknown)}")
    scan = Scan(root=str(root), classes=list(classes), images=[])
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=True) and not _is_ignored(entry.name):
            scan.skipped.append({"path": entry.path, "reason": "not inside a class folder"})
    seen_in_class: dict[tuple[int, str], str] = {}
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for path in _walk_files(class_dir):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                scan.skipped.append({"path": str(path), "reason": f"not an image file extension ({path.suffix or 'none'})"})
                continue
            try:
                content_hash, data = _hash_file(path)
            except OSError as error:
                scan.skipped.append({"path": str(path), "reason": f"cannot read: {error.strerror or error}", "class": name, "unusable": True})
                continue
            probe = probe_image(data)
            if probe.problem:
                scan.skipped.append({"path": str(path), "reason": probe.problem, "class": name, "unusable": True})
                continue
            first = seen_in_class.get((label, content_hash))
            if first is not None:
                scan.skipped.append({"path": str(path), "reason": f"same content as {first} (counted once)",
                                     "class": name, "identical": True})
                continue
            seen_in_class[(label, content_hash)] = str(path)
            relpath = path.relative_to(class_dir).as_posix()
            scan.images.append(ImageFile(str(path), label, relpath, content_hash, probe.decoder))
    conflict = _cross_class_conflicts(scan.images, classes, root)
    if conflict:
        scan.warnings.append(conflict)
    return scan


def _cross_class_conflicts(images, classes, root) -> str | None:
    """A warning naming images whose content appears in more than one class, or None."""
    by_content: dict[str, set[int]] = {}
    for image in images:
        by_content.setdefault(image.content_hash, set()).add(image.label)
    conflicts = [h for h, labels in by_content.items() if len(labels) > 1]
    if not conflicts:
        return None
    listed = [
        f"{', '.join(classes[l] for l in sorted(by_content[h]))}: "
        + next(i.relpath for i in images if i.content_hash == h)
        for h in conflicts[:5]
    ]
    more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
    return f"{len(conflicts)} image(s) in {root} appear in more than one class: " + "; ".join(listed) + more


def identical_files(distinct: int, identical: int) -> str:
    """"20 files, 19 identical to others: 1 distinct image": why a class is smaller than its folder."""
    return (f"{distinct + identical} files, {identical} identical to others: "
            f"{distinct} distinct image{'s' if distinct != 1 else ''}")


def _subject(relpath: str) -> str:
    """The part of the path that is hashed: photos named ``x_nohash_<anything>`` share ``x``."""
    return re.sub(r"_nohash_.*$", "", relpath)


def _bucket(relpath: str) -> float:
    """Percentage in [0, 100] from the file's path (retrain.py's ``which_set`` hash)."""
    hash_name = _subject(relpath)
    digest = hashlib.sha1(hash_name.encode("utf-8")).hexdigest()
    return (int(digest, 16) % (_MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / _MAX_NUM_IMAGES_PER_CLASS)


def split_dataset(
    image_dir: str | os.PathLike,
    validation_percent: float = 10.0,
    test_percent: float = 10.0,
    validation_dir: str | os.PathLike | None = None,
    test_dir: str | os.PathLike | None = None,
) -> Split:
    """Scan ``image_dir`` (and the explicit folders) and return the stable three-way split."""
    main = scan_folder(image_dir)
    classes = main.classes
    if len(classes) < 2:
        raise DatasetError(f"image folder {main.root} has a single class ({classes[0]}): at least 2 are needed")
    val_pct = 0.0 if validation_dir else validation_percent
    test_pct = 0.0 if test_dir else test_percent
    split = Split(classes=classes, train=[], validation=[], test=[], skipped=list(main.skipped), warnings=list(main.warnings))

    group_key, assignment = _assign_by_hash(main.images, val_pct, test_pct)
    for label, name in enumerate(classes):
        _every_split_gets_one(main, split, label, name, group_key, assignment, val_pct, test_pct)
    for image in main.images:
        getattr(split, assignment[image.content_hash]).append(image)
    for target, folder in (("validation", validation_dir), ("test", test_dir)):
        if folder:
            _add_folder(split, target, folder, classes)
    for label, name in enumerate(classes):
        if not any(i.label == label for i in split.train):
            raise DatasetError(f"class {name} has no training images left in {main.root}")
    return split


def _assign_by_hash(images, val_pct: float, test_pct: float) -> tuple[dict[str, str], dict[str, str]]:
    """content hash -> the relative path that places it, and -> its split. Identical content goes
    where its first copy (smallest path) goes."""
    group_key: dict[str, str] = {}
    for image in images:
        key = group_key.get(image.content_hash)
        if key is None or image.relpath < key:
            group_key[image.content_hash] = image.relpath
    assignment: dict[str, str] = {}
    for content_hash, relpath in group_key.items():
        bucket = _bucket(relpath)
        if bucket < val_pct:
            assignment[content_hash] = "validation"
        elif bucket < val_pct + test_pct:
            assignment[content_hash] = "test"
        else:
            assignment[content_hash] = "train"
    return group_key, assignment


def _every_split_gets_one(main, split, label: int, name: str, group_key, assignment, val_pct: float,
                          test_pct: float) -> None:
    """Refuse a class too small for the splits in use (saying why: unusable or identical files),
    then give it at least one image in each of them."""
    needed = 1 + (val_pct > 0) + (test_pct > 0)
    members = [i for i in main.images if i.label == label]
    identical = sum(1 for s in main.skipped if s.get("identical") and s.get("class") == name)
    if identical:
        split.warnings.append(f"class {name}: {identical_files(len(members), identical)}")
    if len(members) < needed:
        what = "no images" if not members else f"{len(members)} usable image(s)"
        unusable = [s for s in main.skipped if s.get("unusable") and s.get("class") == name]
        if unusable:
            what = f"{len(members)} usable image(s) ({len(unusable)} unusable, e.g. {unusable[0]['path']}: {unusable[0]['reason']})"
        if identical:
            what = f"{identical_files(len(members), identical)}" + (f" ({len(unusable)} unusable)" if unusable else "")
        raise DatasetError(
            f"class folder {Path(main.root) / name} has {what}: at least {needed} are needed "
            f"to have one each in {', '.join(s for s, p in zip(SPLITS, (100, val_pct, test_pct)) if p > 0)}"
        )
    # Every class gets at least one image in each split in use: an empty split takes one from
    # train when train can spare it, else from the fullest split (the hash may have sent two
    # of three images to test). A whole _nohash_ subject moves when its split keeps another.
    for target, pct in (("train", 100.0), ("validation", val_pct), ("test", test_pct)):
        if pct <= 0 or any(assignment[i.content_hash] == target for i in members):
            continue
        by_split = {s: [i for i in members if assignment[i.content_hash] == s] for s in SPLITS if s != target}
        donor = max(by_split, key=lambda s: (s == "train" and len(by_split[s]) >= 2, len(by_split[s])))
        donors = by_split[donor]
        if len({i.content_hash for i in donors}) < 2:
            raise DatasetError(
                f"class folder {Path(main.root) / name} has too few distinct images to split "
                f"into {', '.join(SPLITS)}"
                + (f" ({identical_files(len(members), identical)})" if identical else "") + ": add more images"
            )
        chosen = min(donors, key=lambda i: (_bucket(group_key[i.content_hash]), i.relpath))
        moving = [i for i in donors if _subject(i.relpath) == _subject(chosen.relpath)]
        if len(moving) == len(donors):
            moving = [chosen]
        for image in moving:
            assignment[image.content_hash] = target


def _add_folder(split, target: str, folder, classes) -> None:
    """An explicit --validation-dir / --test-dir: its images join ``target``; training copies of them leave training."""
    extra = scan_folder(folder, classes=classes, role=f"{target} folder")
    if not extra.images:
        raise DatasetError(f"{target} folder {extra.root} has no usable images")
    missing = [classes[l] for l in range(len(classes)) if not any(i.label == l for i in extra.images)]
    if missing:
        split.warnings.append(f"{target} folder {extra.root} has no images of: {', '.join(missing)}")
    split.skipped.extend(extra.skipped)
    split.warnings.extend(extra.warnings)
    held_out = {i.content_hash for i in extra.images}
    leaked = [i for i in split.train if i.content_hash in held_out]
    if leaked:
        split.warnings.append(
            f"{len(leaked)} training image(s) also appear in the {target} folder and were left out of training"
        )
        split.train = [i for i in split.train if i.content_hash not in held_out]
        split.skipped.extend({"path": i.path, "reason": f"same content is in the {target} folder"} for i in leaked)
    getattr(split, target).extend(extra.images)
