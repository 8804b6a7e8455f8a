"""retrain.data.dataset: scanning an image folder, validating it and splitting it stably.

Every image is written by the test into tmp_path with Pillow: tiny PNGs whose single colour is
derived from a number, so two files have identical bytes exactly when they were written with
the same number.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from retrain.data.dataset import SPLITS, _bucket, scan_folder, split_dataset
from retrain.errors import DatasetError


# ----------------------------------------------------------------------------- helpers


def png_bytes(seed: int) -> bytes:
    """A 2x2 PNG whose bytes are unique to ``seed`` (< 2**24)."""
    colour = (seed % 256, (seed // 256) % 256, (seed // 65536) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 90, (seed * 7) % 256)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class(root: Path, name: str, count: int, first_seed: int, pattern: str = "img_{:04d}.png") -> list[str]:
    """``count`` distinct images in ``root/name``; returns their file names."""
    names = []
    for index in range(count):
        file_name = pattern.format(index)
        put(root / name / file_name, png_bytes(first_seed + index))
        names.append(file_name)
    return names


def where(split) -> dict[tuple[str, str], str]:
    """(class name, relpath) -> split name, for every image of a Split."""
    table = {}
    for split_name in SPLITS:
        for image in getattr(split, split_name):
            key = (split.classes[image.label], image.relpath)
            assert key not in table, f"{key} is in two splits"
            table[key] = split_name
    return table


def skipped_by_name(result) -> dict[str, str]:
    return {Path(entry["path"]).name: entry["reason"] for entry in result.skipped}


def names_with_buckets(count: int, low: float, high: float, prefix: str, suffix: str = "") -> list[str]:
    """``count`` names whose split hash lands in [low, high) (so where they go without help is known)."""
    found, index = [], 0
    while len(found) < count:
        name = f"{prefix}{index}{suffix}"
        if low <= _bucket(name) < high and name not in found:
            found.append(name)
        index += 1
    return found


BUCKETS = {"validation": (0.0, 10.0), "test": (10.0, 20.0), "train": (20.0, 100.0)}  # at 10% / 10%


# ----------------------------------------------------------------------------- scan_folder


def test_scan_sorts_classes_and_labels_follow_that_order(tmp_path):
    for seed, name in enumerate(["zebra", "Apple", "mango", "banana"]):
        make_class(tmp_path, name, 1, 100 * seed)
    scan = scan_folder(tmp_path)
    assert scan.classes == ["Apple", "banana", "mango", "zebra"]
    labels = {Path(image.path).parent.name: image.label for image in scan.images}
    assert labels == {"Apple": 0, "banana": 1, "mango": 2, "zebra": 3}
    assert scan.root == str(tmp_path)
    assert scan.skipped == []
    assert scan.warnings == []


def test_scan_accepts_image_extensions_in_any_case(tmp_path):
    folder = tmp_path / "cls"
    put(folder / "a.JPG", jpeg_bytes(1))
    put(folder / "b.Jpeg", jpeg_bytes(2))
    put(folder / "c.png", png_bytes(3))
    put(folder / "d.PNG", png_bytes(4))
    put(folder / "e.jpeg", jpeg_bytes(5))
    gif = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(gif, "GIF")
    put(folder / "f.GiF", gif.getvalue())
    bmp = io.BytesIO()
    Image.new("RGB", (4, 4), (4, 5, 6)).save(bmp, "BMP")
    put(folder / "g.Bmp", bmp.getvalue())
    webp = io.BytesIO()
    Image.new("RGB", (4, 4), (7, 8, 9)).save(webp, "WEBP")
    put(folder / "h.WEBP", webp.getvalue())
    scan = scan_folder(tmp_path)
    assert [image.relpath for image in scan.images] == [
        "a.JPG", "b.Jpeg", "c.png", "d.PNG", "e.jpeg", "f.GiF", "g.Bmp", "h.WEBP"
    ]
    decoders = {image.relpath: image.decoder for image in scan.images}
    assert decoders == {
        "a.JPG": "tf", "b.Jpeg": "tf", "c.png": "tf", "d.PNG": "tf", "e.jpeg": "tf",
        "f.GiF": "pillow", "g.Bmp": "pillow", "h.WEBP": "pillow",
    }
    assert scan.skipped == []


def test_scan_image_records_carry_path_label_relpath_and_hash(tmp_path):
    import hashlib

    path = put(tmp_path / "b" / "x.png", png_bytes(42))
    make_class(tmp_path, "a", 1, 0)
    scan = scan_folder(tmp_path)
    record = next(image for image in scan.images if image.label == 1)
    assert record.path == str(path)
    assert record.relpath == "x.png"
    assert record.content_hash == hashlib.sha256(png_bytes(42)).hexdigest()
    assert record.decoder == "tf"


def test_scan_silently_ignores_hidden_and_system_files(tmp_path):
    folder = tmp_path / "cls"
    put(folder / "real.png", png_bytes(1))
    put(folder / ".hidden.png", png_bytes(2))
    put(folder / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    put(folder / "Thumbs.db", b"thumbs")
    put(folder / "desktop.ini", b"[.ShellClassInfo]")
    put(folder / "._real.jpg", b"\x00\x05\x16\x07AppleDouble")
    put(folder / ".thumbnails" / "t.png", png_bytes(3))
    put(folder / "sub" / ".DS_Store", b"junk")
    put(tmp_path / ".DS_Store", b"junk")
    put(tmp_path / "._cls", b"junk")
    put(tmp_path / ".git" / "x.png", png_bytes(4))  # a hidden folder is not a class
    scan = scan_folder(tmp_path)
    assert scan.classes == ["cls"]
    assert [image.relpath for image in scan.images] == ["real.png"]
    assert scan.skipped == []
    assert scan.warnings == []


def test_scan_lists_files_with_other_extensions_in_skipped(tmp_path):
    folder = tmp_path / "cls"
    put(folder / "a.png", png_bytes(1))
    put(folder / "notes.txt", b"some notes")
    put(folder / "README", b"no extension")
    put(folder / "clip.mp4", b"\x00\x00\x00\x18ftypmp42")
    scan = scan_folder(tmp_path)
    assert [image.relpath for image in scan.images] == ["a.png"]
    assert skipped_by_name(scan) == {
        "notes.txt": "not an image file extension (.txt)",
        "README": "not an image file extension (none)",
        "clip.mp4": "not an image file extension (.mp4)",
    }
    assert {entry["path"] for entry in scan.skipped} == {
        str(folder / "notes.txt"), str(folder / "README"), str(folder / "clip.mp4")
    }


def test_scan_lists_top_level_files_as_not_inside_a_class_folder(tmp_path):
    make_class(tmp_path, "a", 1, 0)
    make_class(tmp_path, "b", 1, 10)
    put(tmp_path / "stray.jpg", jpeg_bytes(1))
    put(tmp_path / "labels.txt", b"a\nb\n")
    scan = scan_folder(tmp_path)
    assert scan.classes == ["a", "b"]
    assert len(scan.images) == 2
    assert scan.skipped == [
        {"path": str(tmp_path / "labels.txt"), "reason": "not inside a class folder"},
        {"path": str(tmp_path / "stray.jpg"), "reason": "not inside a class folder"},
    ]


def test_scan_counts_images_in_nested_sub_folders_in_their_class(tmp_path):
    put(tmp_path / "a" / "top.png", png_bytes(1))
    put(tmp_path / "a" / "2019" / "summer" / "beach.png", png_bytes(2))
    put(tmp_path / "a" / "2020" / "x.png", png_bytes(3))
    put(tmp_path / "b" / "deep" / "er" / "est" / "y.png", png_bytes(4))
    scan = scan_folder(tmp_path)
    assert scan.classes == ["a", "b"]
    found = {(scan.classes[image.label], image.relpath) for image in scan.images}
    assert found == {
        ("a", "top.png"),
        ("a", "2019/summer/beach.png"),
        ("a", "2020/x.png"),
        ("b", "deep/er/est/y.png"),
    }


def test_scan_skips_zero_byte_image_as_empty_file(tmp_path):
    put(tmp_path / "a" / "good.png", png_bytes(1))
    put(tmp_path / "a" / "zero.jpg", b"")
    scan = scan_folder(tmp_path)
    assert [image.relpath for image in scan.images] == ["good.png"]
    assert scan.skipped == [{"path": str(tmp_path / "a" / "zero.jpg"), "reason": "empty file", "class": "a", "unusable": True}]


def test_scan_skips_decompression_bomb_header(tmp_path):
    data = bytearray(png_bytes(1))
    data[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    put(tmp_path / "a" / "bomb.png", bytes(data))
    put(tmp_path / "a" / "ok.png", png_bytes(2))
    scan = scan_folder(tmp_path)
    assert [image.relpath for image in scan.images] == ["ok.png"]
    reason = skipped_by_name(scan)["bomb.png"]
    assert "20000x20000" in reason and "decompression bomb" in reason


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_scan_symlink_loops_do_not_hang_and_count_files_once(tmp_path):
    folder = tmp_path / "a"
    put(folder / "one.png", png_bytes(1))
    put(folder / "sub" / "two.png", png_bytes(2))
    os.symlink(folder, folder / "sub" / "up")  # points back at its parent's parent
    os.symlink(folder / "sub", folder / "sub" / "self")  # points at the folder it is in
    scan = scan_folder(tmp_path)
    assert sorted(image.relpath for image in scan.images) == ["one.png", "sub/two.png"]
    assert scan.skipped == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_scan_follows_a_symlinked_class_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "dogs"
    put(elsewhere / "d.png", png_bytes(5))
    root = tmp_path / "images"
    make_class(root, "cats", 1, 0)
    os.symlink(elsewhere, root / "dogs")
    scan = scan_folder(root)
    assert scan.classes == ["cats", "dogs"]
    assert [(scan.classes[i.label], i.relpath) for i in scan.images] == [("cats", "img_0000.png"), ("dogs", "d.png")]


def test_scan_counts_identical_content_once_per_class(tmp_path):
    folder = tmp_path / "a"
    put(folder / "1.png", png_bytes(7))
    put(folder / "2.png", png_bytes(7))
    put(folder / "sub" / "3.png", png_bytes(7))
    put(folder / "4.png", png_bytes(8))
    scan = scan_folder(tmp_path)
    assert [image.relpath for image in scan.images] == ["1.png", "4.png"]
    first = str(folder / "1.png")
    assert scan.skipped == [
        {"path": str(folder / "2.png"), "reason": f"same content as {first} (counted once)", "class": "a", "identical": True},
        {"path": str(folder / "sub" / "3.png"), "reason": f"same content as {first} (counted once)", "class": "a",
         "identical": True},
    ]
    assert scan.warnings == []


def test_scan_warns_when_identical_content_is_in_two_classes(tmp_path):
    put(tmp_path / "cats" / "shared.png", png_bytes(9))
    put(tmp_path / "cats" / "c.png", png_bytes(10))
    put(tmp_path / "dogs" / "copy_of_shared.png", png_bytes(9))
    put(tmp_path / "dogs" / "d.png", png_bytes(11))
    scan = scan_folder(tmp_path)
    assert len(scan.images) == 4  # counted once per class, in each class
    assert len(scan.warnings) == 1
    warning = scan.warnings[0]
    assert warning.startswith(f"1 image(s) in {tmp_path} appear in more than one class")
    assert "cats, dogs: shared.png" in warning


def test_scan_warning_lists_at_most_five_conflicts(tmp_path):
    for index in range(7):
        put(tmp_path / "a" / f"a{index}.png", png_bytes(index))
        put(tmp_path / "b" / f"b{index}.png", png_bytes(index))
    scan = scan_folder(tmp_path)
    assert len(scan.warnings) == 1
    assert scan.warnings[0].startswith("7 image(s)")
    assert scan.warnings[0].endswith(" (and 2 more)")
    assert scan.warnings[0].count("a, b: ") == 5


# ----------------------------------------------------------------------------- split_dataset


def test_split_is_deterministic(tmp_path):
    for seed, name in enumerate(["a", "b", "c"]):
        make_class(tmp_path, name, 30, 1000 * seed)
    first = split_dataset(tmp_path)
    second = split_dataset(tmp_path)
    assert where(first) == where(second)
    for name in SPLITS:
        assert [i.path for i in getattr(first, name)] == [i.path for i in getattr(second, name)]
    assert sum(first.counts().values()) == 90
    assert first.counts_per_class() == second.counts_per_class()


def test_split_counts_and_counts_per_class_agree_with_lists(tmp_path):
    make_class(tmp_path, "a", 50, 0)
    make_class(tmp_path, "b", 20, 1000)
    split = split_dataset(tmp_path)
    per_class = split.counts_per_class()
    assert set(per_class) == {"a", "b"}
    assert sum(per_class["a"].values()) == 50
    assert sum(per_class["b"].values()) == 20
    for name in SPLITS:
        assert split.counts()[name] == len(getattr(split, name)) == per_class["a"][name] + per_class["b"][name]


def test_split_follows_the_path_hash_when_no_class_needs_help(tmp_path):
    """Each image goes where its bucket says (retrain.py's which_set), exactly."""
    make_class(tmp_path, "a", 80, 0)
    make_class(tmp_path, "b", 80, 1000)
    split = split_dataset(tmp_path, validation_percent=10, test_percent=20)
    for (name, relpath), split_name in where(split).items():
        bucket = _bucket(relpath)
        expected = "validation" if bucket < 10 else "test" if bucket < 30 else "train"
        assert split_name == expected, (name, relpath, bucket)


def test_split_is_stable_when_photos_are_added(tmp_path):
    make_class(tmp_path, "a", 60, 0)
    make_class(tmp_path, "b", 60, 1000)
    before = where(split_dataset(tmp_path))
    # Every class already has a hash-chosen validation and test image, so no image was moved
    # to fill a split and the hash alone decides (see test_split_follows_the_path_hash...).
    for name in ("a", "b"):
        assert {s for (c, _), s in before.items() if c == name} == set(SPLITS)
    for index in range(60, 140):
        put(tmp_path / "a" / f"img_{index:04d}.png", png_bytes(index))
        put(tmp_path / "b" / f"new_{index:04d}.png", png_bytes(1000 + index))
    put(tmp_path / "a" / "extra" / "more.png", png_bytes(5000))
    after = where(split_dataset(tmp_path))
    assert len(after) == len(before) + 161
    moved = {key: (split_name, after[key]) for key, split_name in before.items() if after[key] != split_name}
    assert moved == {}


def test_split_keeps_nohash_groups_together(tmp_path):
    for label, name in enumerate(["a", "b"]):
        for subject in range(40):
            for shot in range(3):
                put(tmp_path / name / f"subj{subject}_nohash_{shot}.png", png_bytes(10000 * label + 10 * subject + shot))
    put(tmp_path / "a" / "a_nohash_1.jpg", jpeg_bytes(1))
    put(tmp_path / "a" / "a_nohash_2.jpg", jpeg_bytes(2))
    split = split_dataset(tmp_path)
    table = where(split)
    assert len(table) == 242
    assert table[("a", "a_nohash_1.jpg")] == table[("a", "a_nohash_2.jpg")]
    groups: dict[tuple[str, str], set[str]] = {}
    for (name, relpath), split_name in table.items():
        groups.setdefault((name, relpath.split("_nohash_")[0]), set()).add(split_name)
    assert all(len(found) == 1 for found in groups.values()), {k: v for k, v in groups.items() if len(v) > 1}
    # and the groups really are spread over the three splits
    assert {next(iter(found)) for found in groups.values()} == set(SPLITS)


def test_split_keeps_nohash_groups_together_when_a_small_class_needs_help(tmp_path):
    """A class whose hashes put everything in train still keeps each subject in one split."""
    stems = names_with_buckets(4, *BUCKETS["train"], "subject")  # all land in train by hash
    for index, stem in enumerate(stems):
        put(tmp_path / "a" / f"{stem}_nohash_1.png", png_bytes(10 * index + 1))
        put(tmp_path / "a" / f"{stem}_nohash_2.png", png_bytes(10 * index + 2))
    make_class(tmp_path, "b", 30, 1000)
    split = split_dataset(tmp_path)
    table = {relpath: s for (name, relpath), s in where(split).items() if name == "a"}
    assert len(table) == 8
    for stem in stems:
        assert table[f"{stem}_nohash_1.png"] == table[f"{stem}_nohash_2.png"], (stem, table)
    assert split.counts_per_class()["a"] == {"train": 4, "validation": 2, "test": 2}


def test_split_single_subject_class_is_still_split(tmp_path):
    """With one subject only, its photos have to be spread to fill validation and test."""
    for shot in range(4):
        put(tmp_path / "a" / f"only_nohash_{shot}.png", png_bytes(shot))
    make_class(tmp_path, "b", 30, 1000)
    split = split_dataset(tmp_path)
    assert split.counts_per_class()["a"] == {"train": 2, "validation": 1, "test": 1}


@pytest.mark.parametrize("count", [3, 4, 5])
def test_split_gives_every_class_validation_and_test_images(tmp_path, count):
    for variant in range(25):
        root = tmp_path / f"v{variant}"
        for label, name in enumerate(["a", "b"]):
            make_class(root, name, count, 100 * label, pattern=f"{name}{variant}_photo{{}}.jpg")
        split = split_dataset(root)
        for name, counts in split.counts_per_class().items():
            assert counts["validation"] >= 1, (variant, name, counts)
            assert counts["test"] >= 1, (variant, name, counts)
            assert counts["train"] >= 1, (variant, name, counts)
            assert sum(counts.values()) == count
        if count == 3:
            assert split.counts_per_class() == {n: {"train": 1, "validation": 1, "test": 1} for n in ("a", "b")}


@pytest.mark.parametrize(
    "by_hash",
    [
        ("test", "test", "train"),
        ("validation", "validation", "train"),
        ("validation", "test", "test"),
        ("validation", "validation", "validation"),
        ("test", "test", "test", "test"),
        ("validation", "validation", "test", "test"),
        ("train", "train", "train"),
        ("validation", "train", "train", "train", "train"),
    ],
    ids="-".join,
)
def test_split_fills_every_split_of_a_small_class_whatever_the_hash_says(tmp_path, by_hash):
    """Where the hash sends a small class's images must not decide whether the folder is usable."""
    names = []
    for split_name in set(by_hash):
        low, high = BUCKETS[split_name]
        names += names_with_buckets(by_hash.count(split_name), low, high, f"{split_name}_", ".png")
    for index, name in enumerate(names):
        put(tmp_path / "a" / name, png_bytes(index))
    make_class(tmp_path, "b", 40, 1000)
    split = split_dataset(tmp_path, validation_percent=10, test_percent=10)
    counts = split.counts_per_class()["a"]
    assert all(counts[s] >= 1 for s in SPLITS), counts
    assert sum(counts.values()) == len(by_hash)
    table = {relpath: s for (c, relpath), s in where(split).items() if c == "a"}
    # images are only moved out of a split that has more than one
    for split_name in SPLITS:
        hashed_here = [n for n in names if n.startswith(split_name + "_")]
        if len(hashed_here) == 1:
            assert table[hashed_here[0]] == split_name


def test_split_roughly_respects_percentages(tmp_path):
    make_class(tmp_path, "a", 400, 0)
    make_class(tmp_path, "b", 400, 1000, pattern="photo-{}.png")
    split = split_dataset(tmp_path, validation_percent=10, test_percent=10)
    for name, counts in split.counts_per_class().items():
        assert sum(counts.values()) == 400
        assert 20 <= counts["validation"] <= 60, (name, counts)
        assert 20 <= counts["test"] <= 60, (name, counts)
    other = split_dataset(tmp_path, validation_percent=30, test_percent=5)
    for name, counts in other.counts_per_class().items():
        assert 90 <= counts["validation"] <= 150, (name, counts)
        assert 5 <= counts["test"] <= 40, (name, counts)


def test_split_without_test_needs_two_images_and_makes_no_test_split(tmp_path):
    make_class(tmp_path, "a", 2, 0)
    make_class(tmp_path, "b", 40, 1000)
    split = split_dataset(tmp_path, validation_percent=10, test_percent=0)
    assert split.test == []
    assert split.counts_per_class()["a"] == {"train": 1, "validation": 1, "test": 0}


def test_split_puts_identical_content_of_two_classes_in_the_same_split(tmp_path):
    make_class(tmp_path, "a", 30, 0)
    make_class(tmp_path, "b", 30, 1000)
    for index in range(40):
        put(tmp_path / "a" / f"shared_{index}.png", png_bytes(5000 + index))
        put(tmp_path / "b" / f"zz_other_name_{index}.png", png_bytes(5000 + index))
    split = split_dataset(tmp_path)
    table = where(split)
    assert len(table) == 140
    pairs = [(table[("a", f"shared_{i}.png")], table[("b", f"zz_other_name_{i}.png")]) for i in range(40)]
    assert all(x == y for x, y in pairs), pairs
    assert {x for x, _ in pairs} == set(SPLITS)  # the duplicates are not all in one split
    assert any("40 image(s)" in warning and "appear in more than one class" in warning for warning in split.warnings)


def test_split_with_validation_folder_uses_it_and_ignores_the_percentage(tmp_path):
    main, held = tmp_path / "main", tmp_path / "val"
    make_class(main, "a", 40, 0)
    make_class(main, "b", 40, 1000)
    put(held / "b" / "v1.png", png_bytes(9001))
    put(held / "b" / "v2.png", png_bytes(9002))
    put(held / "a" / "v3.png", png_bytes(9003))
    split = split_dataset(main, validation_percent=50, test_percent=10, validation_dir=held)
    assert {i.path: split.classes[i.label] for i in split.validation} == {
        str(held / "a" / "v3.png"): "a",
        str(held / "b" / "v1.png"): "b",
        str(held / "b" / "v2.png"): "b",
    }
    from_main = split.train + split.test
    assert len(from_main) == 80
    assert all(Path(i.path).is_relative_to(main) for i in from_main)
    # with the validation share gone, the hash sends [0, 10) to test and everything else to train
    for label in range(2):
        in_test = {i.relpath for i in split.test if i.label == label}
        by_hash = {i.relpath for i in from_main if i.label == label and _bucket(i.relpath) < 10}
        assert by_hash and in_test == by_hash
    assert all(c["test"] >= 1 and c["train"] >= 1 for c in split.counts_per_class().values())
    assert split.warnings == []


def test_split_with_test_folder_only_needs_two_images_per_class(tmp_path):
    main, held = tmp_path / "main", tmp_path / "test"
    make_class(main, "a", 2, 0)
    make_class(main, "b", 2, 100)
    make_class(held, "a", 1, 500)
    make_class(held, "b", 1, 600)
    split = split_dataset(main, test_dir=held)
    assert split.counts_per_class() == {n: {"train": 1, "validation": 1, "test": 1} for n in ("a", "b")}
    assert {Path(i.path).parent.parent for i in split.test} == {held}


def test_split_warns_when_validation_folder_lacks_a_class(tmp_path):
    main, held = tmp_path / "main", tmp_path / "val"
    make_class(main, "a", 10, 0)
    make_class(main, "b", 10, 100)
    make_class(held, "b", 2, 500)
    split = split_dataset(main, validation_dir=held)
    assert f"validation folder {held} has no images of: a" in split.warnings
    assert len(split.validation) == 2


def test_split_rejects_validation_folder_with_unknown_class(tmp_path):
    main, held = tmp_path / "main", tmp_path / "val"
    make_class(main, "a", 10, 0)
    make_class(main, "b", 10, 100)
    make_class(held, "a", 1, 500)
    make_class(held, "zebra", 1, 600)
    with pytest.raises(DatasetError) as info:
        split_dataset(main, validation_dir=held)
    message = str(info.value)
    assert str(held) in message
    assert "validation folder" in message
    assert "classes the training folder lacks: zebra" in message


def test_split_rejects_explicit_folder_without_usable_images(tmp_path):
    main, held = tmp_path / "main", tmp_path / "test"
    make_class(main, "a", 10, 0)
    make_class(main, "b", 10, 100)
    put(held / "a" / "notes.txt", b"nothing here")
    with pytest.raises(DatasetError, match="no usable images") as info:
        split_dataset(main, test_dir=held)
    assert f"test folder {held} has no usable images" in str(info.value)


def test_split_removes_training_images_that_are_in_the_test_folder(tmp_path):
    main, held = tmp_path / "main", tmp_path / "test"
    make_class(main, "a", 30, 0)
    make_class(main, "b", 30, 1000)
    make_class(held, "a", 1, 6000, pattern="held_{}.png")
    make_class(held, "b", 1, 7000, pattern="held_{}.png")
    baseline = split_dataset(main, test_dir=held)
    assert baseline.warnings == []
    train_a = sorted(i.relpath for i in baseline.train if i.label == 0)
    leaked = train_a[:3]
    for index, relpath in enumerate(leaked):
        shutil.copyfile(main / "a" / relpath, held / "a" / f"copy_{index}.png")
    split = split_dataset(main, test_dir=held)
    assert "3 training image(s) also appear in the test folder and were left out of training" in split.warnings
    assert sorted(i.relpath for i in split.train if i.label == 0) == train_a[3:]
    assert [i.relpath for i in split.train if i.label == 1] == [i.relpath for i in baseline.train if i.label == 1]
    held_out = {i.content_hash for i in split.test}
    assert not any(i.content_hash in held_out for i in split.train)
    leaked_paths = {str(main / "a" / relpath) for relpath in leaked}
    assert [e for e in split.skipped if e["path"] in leaked_paths] == [
        {"path": str(main / "a" / relpath), "reason": "same content is in the test folder"} for relpath in leaked
    ]
    assert len(split.test) == 5
    assert all(Path(i.path).is_relative_to(held) for i in split.test)


def test_split_passes_on_skipped_files_and_warnings(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    make_class(tmp_path, "b", 10, 100)
    put(tmp_path / "a" / "notes.txt", b"x")
    put(tmp_path / "b" / "empty.png", b"")
    put(tmp_path / "b" / "dup.png", png_bytes(0))  # same as a/img_0000.png
    split = split_dataset(tmp_path)
    assert skipped_by_name(split) == {"notes.txt": "not an image file extension (.txt)", "empty.png": "empty file"}
    assert len(split.warnings) == 1 and "a, b: img_0000.png" in split.warnings[0]


# ----------------------------------------------------------------------------- errors


def test_error_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as info:
        split_dataset(missing)
    assert str(info.value) == f"image folder {missing} does not exist"


def test_error_file_instead_of_folder(tmp_path):
    path = put(tmp_path / "file.png", png_bytes(1))
    with pytest.raises(DatasetError) as info:
        split_dataset(path)
    assert str(info.value) == f"image folder {path} is not a folder"


def test_error_folder_without_class_sub_folders(tmp_path):
    put(tmp_path / "a.png", png_bytes(1))
    put(tmp_path / "b.png", png_bytes(2))
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    assert str(info.value).startswith(f"image folder {tmp_path} has no class sub-folders")
    assert f"{tmp_path}/<class>/<images>" in str(info.value)


def test_error_single_class(tmp_path):
    make_class(tmp_path, "only", 10, 0)
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    assert str(info.value) == f"image folder {tmp_path} has a single class (only): at least 2 are needed"


def test_error_empty_class_folder(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith(f"class folder {tmp_path / 'empty'} has no images: at least 3 are needed")
    assert "train, validation, test" in message


def test_error_class_with_only_unusable_files(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    put(tmp_path / "b" / "notes.txt", b"x")
    put(tmp_path / "b" / "zero.png", b"")
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    assert str(info.value).startswith(
        f"class folder {tmp_path / 'b'} has 0 usable image(s) (1 unusable, e.g. {tmp_path / 'b' / 'zero.png'}: empty file)"
    )


def test_error_class_with_two_images(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    make_class(tmp_path, "b", 2, 100)
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    assert str(info.value) == (
        f"class folder {tmp_path / 'b'} has 2 usable image(s): at least 3 are needed "
        "to have one each in train, validation, test"
    )


def test_error_class_of_duplicates_of_one_image(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    for index in range(5):
        put(tmp_path / "b" / f"same_{index}.png", png_bytes(777))
    with pytest.raises(DatasetError) as info:
        split_dataset(tmp_path)
    assert str(info.value) == (f"class folder {tmp_path / 'b'} has 5 files, 4 identical to others: 1 distinct image: "
                               "at least 3 are needed to have one each in train, validation, test")


def test_error_class_with_too_few_distinct_images(tmp_path):
    """Three files, but only two distinct contents once the class is counted."""
    make_class(tmp_path, "a", 10, 0)
    put(tmp_path / "b" / "x.png", png_bytes(500))
    put(tmp_path / "b" / "y.png", png_bytes(500))
    put(tmp_path / "b" / "z.png", png_bytes(501))
    with pytest.raises(DatasetError, match="has 3 files, 1 identical to others: 2 distinct images: at least 3"):
        split_dataset(tmp_path)


def test_identical_files_that_shrink_a_class_are_explained(tmp_path):
    make_class(tmp_path, "a", 10, 0)
    make_class(tmp_path, "b", 10, 100)
    for index in range(3):
        put(tmp_path / "b" / f"copy_{index}.png", png_bytes(100))
    split = split_dataset(tmp_path)
    assert "class b: 13 files, 3 identical to others: 10 distinct images" in split.warnings


def test_split_folders_given_as_classes_are_refused_with_the_fix(tmp_path):
    for split in ("train", "validation"):
        for name in ("cats", "dogs"):
            put(tmp_path / split / name / "x.png", png_bytes(hash((split, name)) % 200))
    with pytest.raises(DatasetError) as caught:
        scan_folder(tmp_path)
    assert str(caught.value) == (
        f"image folder {tmp_path} holds split folders (train, validation), not class folders: "
        f"pass {tmp_path / 'train'} as the image folder and --validation-dir {tmp_path / 'validation'}"
    )
    # classes that merely share such names, with images directly inside, are classes
    flat = tmp_path / "flat"
    put(flat / "test" / "a.png", png_bytes(1))
    put(flat / "train" / "b.png", png_bytes(2))
    assert scan_folder(flat).classes == ["test", "train"]
