"""Nothing that is not ours is ever replaced or deleted (safety.py), whatever the flags.

Each slip puts a user's folder full of files where the tool writes: the command exits 1 with one
``Error:`` line and every file under the test's folder is byte for byte what it was. The tool's
own jobs next to user files (replacing an earlier model or report, clearing the cache, cleaning
up after killed runs) touch only what the tool wrote.
"""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrain import safety
from retrain.features.bottlenecks import BottleneckCache, cache_summary, clean_stale_temporaries, clear_cache
from retrain.cli import main
from retrain.errors import OutputError
from retrain.files import make_stage, replace_dir
from tiny_modules import write_colour_images

FAST = ["--epochs", "3", "--quantize", "none"]
ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict:
    """Every path under ``root``: files by content digest, links by target, folders as such."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_file():
            found[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        else:
            found[relative] = ("dir",)
    return found


def user_folder(path: Path, images_from: Path | None = None) -> Path:
    """A folder full of a user's files: photos in sub-folders (when given), notes, nested files, hidden ones."""
    if images_from is not None:
        shutil.copytree(images_from, path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes")
    nested = next((p for p in sorted(path.iterdir()) if p.is_dir()), path / "album") / "raw" / "2024"
    nested.mkdir(parents=True)
    (nested / "beach.raw").write_bytes(b"\x00 precious")
    (path / ".hidden").write_text("mine too")
    (path / ".tmp-1-x").write_text("looks like a temporary file, is not one")
    return path


@pytest.fixture(scope="module")
def made(tiny_module, colour_dir, tmp_path_factory):
    """A trained model, its cache and a report, made once; each test copies what it needs."""
    base = tmp_path_factory.mktemp("made")
    runner = CliRunner()
    done = runner.invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(base / "model"),
                                "--cache-dir", str(base / "cache"), *FAST], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    done = runner.invoke(main, ["evaluate", str(base / "model"), str(colour_dir), "--report", str(base / "report")],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return base


@pytest.fixture
def world(tmp_path, made, tiny_module, colour_dir):
    """The test's folder: photos (an image folder with other files too), documents, a module, a
    model, a report and a cache, side by side."""
    w = {"tmp": tmp_path}
    w["photos"] = user_folder(tmp_path / "photos", colour_dir)
    w["held"] = user_folder(tmp_path / "held out", write_colour_images(tmp_path / "scratch-held", seed=3))
    shutil.rmtree(tmp_path / "scratch-held")
    w["documents"] = user_folder(tmp_path / "Documents")
    w["module"] = tmp_path / "module"
    shutil.copytree(tiny_module, w["module"])
    for name in ("model", "report", "cache"):
        w[name] = tmp_path / name
        shutil.copytree(made / name, w[name], symlinks=True)
    (tmp_path / "link to photos").symlink_to(w["photos"], target_is_directory=True)
    (tmp_path / "link to documents").symlink_to(w["documents"], target_is_directory=True)
    w["photos link"] = tmp_path / "link to photos"
    w["documents link"] = tmp_path / "link to documents"
    return w


def _train(w, output, *extra, images=None, cache=None):
    return ["train", str(images or w["photos"]), "-m", str(w["module"]), "-o", str(output),
            "--cache-dir", str(cache or w["cache"]), "--overwrite", *FAST, *extra]


# Each slip: the arguments (from the world's paths) and words the one error line must hold.
SLIPS = {
    "output is the image folder": (lambda w: _train(w, w["photos"]), "is the image folder"),
    "output inside the image folder": (lambda w: _train(w, w["photos"] / "models" / "new"), "lies inside the image folder"),
    "output contains the image folder": (lambda w: _train(w, w["tmp"] / "new" / ".."), "contains the image folder"),
    "output is a folder of documents": (lambda w: _train(w, w["documents"]), "never replaces it, even with --overwrite"),
    "output is a link to the image folder": (lambda w: _train(w, w["photos link"]), "is the image folder"),
    "output through .. is the image folder": (lambda w: _train(w, f"{w['photos']}/album/../"), "is the image folder"),
    "output is a link to documents": (lambda w: _train(w, w["documents link"]), "never replaces it"),
    "output is the module": (lambda w: _train(w, w["module"]), "is the module folder"),
    "output inside the module": (lambda w: _train(w, w["module"] / "variables" / "new"), "lies inside the module folder"),
    "output is the cache": (lambda w: _train(w, w["cache"]), "is the cache folder"),
    "output inside the cache": (lambda w: _train(w, w["cache"] / "models"), "lies inside the cache folder"),
    "output is the validation folder": (lambda w: _train(w, w["held"], "--validation-dir", str(w["held"])), "is the validation folder"),
    "output inside the test folder": (lambda w: _train(w, w["held"] / "blue" / "new", "--test-dir", str(w["held"])), "lies inside the test folder"),
    "output is a file": (lambda w: _train(w, w["documents"] / "notes.txt"), "is not a folder"),
    "earlier model with a user file": (lambda w: _train(w, w["model with notes"]), "1 file(s) retrain did not write (e.g. my notes.txt)"),
    "TF Hub cache is the image folder": (lambda w: ["train", str(w["photos"]), "-m", "https://tfhub.dev/google/x/feature_vector/5", "-o", str(w["tmp"] / "new")], "the TF Hub cache folder"),
    "cache is the image folder": (lambda w: _train(w, w["tmp"] / "new", cache=w["photos"]), "is the image folder"),
    "cache is a folder of documents": (lambda w: _train(w, w["tmp"] / "new", cache=w["documents"]), "is not a retrain cache"),
    "cache inside the image folder": (lambda w: _train(w, w["tmp"] / "new", cache=w["photos"] / "cache"), "lies inside the image folder"),
    "cache contains the output": (lambda w: _train(w, w["tmp"] / "c" / "out", cache=w["tmp"] / "c"), "lies inside the cache folder"),
    "report is the image folder": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["photos"]), "--overwrite"], "is the image folder"),
    "report is documents": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["documents"]), "--overwrite"], "never replaces it, even with --overwrite"),
    "report is a link to documents": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["documents link"]), "--overwrite"], "never replaces it"),
    "report is the model folder": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["model"]), "--overwrite"], "is the model"),
    "report inside the model folder": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["model"] / "report"), "--overwrite"], "lies inside the model"),
    "report inside the image folder": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["photos"] / "report"), "--overwrite"], "lies inside the image folder"),
    "report contains the tflite model": (lambda w: ["evaluate", str(w["model"] / "model.tflite"), str(w["photos"]), "--report", str(w["model"]), "--overwrite"], "contains the model"),
    "earlier report with a user file": (lambda w: ["evaluate", str(w["model"]), str(w["photos"]), "--report", str(w["report with notes"]), "--overwrite"], "retrain did not write"),
    "cache clear on the image folder": (lambda w: ["cache", "clear", "--cache-dir", str(w["photos"]), "--yes"], "is not a retrain cache"),
    "cache clear on documents": (lambda w: ["cache", "clear", "--cache-dir", str(w["documents"]), "--yes"], "is not a retrain cache"),
    "cache clear on a link to documents": (lambda w: ["cache", "clear", "--cache-dir", str(w["documents link"]), "--yes"], "is not a retrain cache"),
    "cache clear on the parent of everything": (lambda w: ["cache", "clear", "--cache-dir", str(w["tmp"]), "--yes"], "is not a retrain cache"),
    "cache info on the image folder": (lambda w: ["cache", "info", "--cache-dir", str(w["photos"])], "is not a retrain cache"),
    "cache clear on another program's cache": (lambda w: ["cache", "clear", "--cache-dir", str(w["other cache"]), "--yes"], "another program's cache"),
    "export into the image folder": (lambda w: ["export", str(w["photos"]), "--format", "tflite"], "cannot read"),
    "export over a user's file": (lambda w: ["export", str(w["model"]), "--format", "tflite-float16"], "was not written by retrain"),
    "export calibrating from the model folder's parent": (lambda w: ["export", str(w["model"]), "--format", "tflite-int8-full", "--representative", str(w["tmp"])], "lies inside the representative folder"),
}


@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_a_slip_is_one_line_exit_1_and_every_file_survives(slip, world, monkeypatch):
    w = world
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(w["cache"]))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(w["photos"]))
    w["model with notes"] = w["tmp"] / "model with notes"
    shutil.copytree(w["model"], w["model with notes"])
    (w["model with notes"] / "my notes.txt").write_text("what I changed")
    w["report with notes"] = w["tmp"] / "report with notes"
    shutil.copytree(w["report"], w["report with notes"])
    (w["report with notes"] / "todo.txt").write_text("look at these")
    (w["model"] / "model_float16.tflite").write_bytes(b"a user's own file with a name the tool uses")
    w["other cache"] = w["tmp"] / "other cache"
    w["other cache"].mkdir()
    (w["other cache"] / "CACHEDIR.TAG").write_text(safety.TAG_SIGNATURE + "\n# made by another tool\n")
    (w["other cache"] / "blob").write_bytes(b"theirs")

    args, words = SLIPS[slip]
    args = args(w)
    before = snapshot(w["tmp"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(w["tmp"]) == before


def test_overwrite_replaces_an_earlier_model_and_nothing_beside_it(world):
    w = world
    parent = w["documents"]  # the model lives among the user's files
    out = parent / "my model"
    runner = CliRunner()
    done = runner.invoke(main, _train(w, out), catch_exceptions=False)
    assert done.exit_code == 0, done.output
    run = json.loads((out / "run.json").read_text())
    assert run["tool"] == "retrain" and run["output_kind"] == "model"
    assert run["files"] == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    others = {k: v for k, v in snapshot(parent).items() if not k.startswith("my model")}
    again = runner.invoke(main, _train(w, out, "--json"), catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["cache"]["misses"] == 0
    assert {k: v for k, v in snapshot(parent).items() if not k.startswith("my model")} == others
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".my model")) == []


def test_an_empty_folder_and_an_earlier_model_from_before_manifests_are_replaced(world):
    w = world
    empty = w["tmp"] / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, _train(w, empty), catch_exceptions=False).exit_code == 0
    run = json.loads((empty / "run.json").read_text())
    del run["files"]  # as written before the manifest existed: recognised by its names
    (empty / "run.json").write_text(json.dumps(run))
    assert CliRunner().invoke(main, _train(w, empty), catch_exceptions=False).exit_code == 0
    assert "files" in json.loads((empty / "run.json").read_text())


def test_export_writes_only_its_files_and_records_them(world):
    w = world
    (w["model"] / "model_float16.tflite").unlink(missing_ok=True)
    done = CliRunner().invoke(main, ["export", str(w["model"]), "--format", "tflite-float16"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "model_float16.tflite" in json.loads((w["model"] / "run.json").read_text())["files"]
    assert not [p for p in w["tmp"].iterdir() if ".partial-" in p.name]
    # the folder is still a replaceable earlier model: every file in it is listed
    assert safety.why_not_replaceable(w["model"], safety.MODEL) is None


def test_cache_clear_removes_only_the_cache_files(world):
    w = world
    cache = w["cache"]
    (cache / "my file.txt").write_text("mine")
    entry = safety.cache_entries(cache)[0]
    (entry / "mine.npz").write_bytes(b"not a shard name the cache uses")
    shards = [p for p in entry.iterdir() if safety.SHARD_NAME.fullmatch(p.name)]
    key_files = [p for p in entry.iterdir() if safety.SHARD_KEYS_NAME.fullmatch(p.name)]  # the index: one per shard
    assert shards and len(key_files) == len(shards)
    (entry / "mine.keys").write_bytes(b"not a key file name the cache uses")
    converted = list((cache / safety.CONVERTED_DIR).glob("*.tflite"))  # the module's LiteRT conversion
    done = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", str(cache), "--yes"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(f"removed {len(shards) + len(key_files) + len(converted)} file(s)")
    assert (entry / "mine.keys").read_bytes() == b"not a key file name the cache uses"
    assert (cache / "my file.txt").read_text() == "mine"
    assert (entry / "mine.npz").read_bytes() == b"not a shard name the cache uses"
    assert not any(p.exists() for p in shards + key_files)
    assert (cache / "CACHEDIR.TAG").read_text().startswith(safety.TAG_SIGNATURE)


def test_a_cache_from_before_the_tag_is_recognised_and_tagged(world):
    w = world
    (w["cache"] / "CACHEDIR.TAG").unlink()
    assert safety.why_not_cache(w["cache"]) is None
    info = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(w["cache"]), "--json"], catch_exceptions=False)
    assert info.exit_code == 0 and json.loads(info.stdout)["entries"]
    done = CliRunner().invoke(main, _train(w, w["tmp"] / "new", "--json"), catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["cache"]["hits"] > 0
    assert (w["cache"] / "CACHEDIR.TAG").read_text().startswith(safety.TAG_SIGNATURE)


def test_a_new_cache_is_tagged_and_an_empty_folder_may_become_one(tmp_path):
    cache = BottleneckCache(tmp_path / "fresh", "0" * 64, "a" * 12)
    import numpy as np

    cache.write(["k" * 64], np.zeros((1, 4), np.float32))
    assert (tmp_path / "fresh" / "CACHEDIR.TAG").read_text().startswith(safety.TAG_SIGNATURE)
    (tmp_path / "empty").mkdir()
    assert cache_summary(tmp_path / "empty")["entries"] == []
    assert clear_cache(tmp_path / "missing") == 0


def test_stale_temporaries_are_only_the_cache_own(world):
    w = world
    cache = w["cache"]
    entry = safety.cache_entries(cache)[0]
    stale = entry / f".tmp-{os.getpid()}-{'0' * 32}.npz"
    stale.write_bytes(b"left by a killed run")
    fresh = entry / f".tmp-{os.getpid()}-{'1' * 32}.npz"
    fresh.write_bytes(b"a live writer's")
    (cache / "mine").mkdir()
    lookalike = cache / "mine" / f".tmp-1-{'0' * 32}.npz"
    lookalike.write_bytes(b"mine")
    old = time.time() - 7200
    for path in (stale, lookalike):
        os.utime(path, (old, old))
    assert clean_stale_temporaries(cache) == 1
    assert not stale.exists() and fresh.exists() and lookalike.read_bytes() == b"mine"
    with pytest.raises(OutputError, match="is not a retrain cache"):
        clean_stale_temporaries(w["photos"])


def test_staging_leftovers_are_removed_only_when_marked(tmp_path):
    target = tmp_path / "out"
    dead = 2 ** 22 + 12345  # above the usual pid range: no such process
    mine = user_folder(tmp_path / f".out.partial-{dead}-deadbeef")
    before = snapshot(mine)
    leftover = make_stage(target)
    leftover.rename(tmp_path / f".out.partial-{dead}-0badcafe")
    (tmp_path / f".out.staging-{dead}-00000000").mkdir()  # killed between mkdir and its mark: empty
    theirs = user_folder(tmp_path / f".out.staging-{dead}-11111111")
    theirs_before = snapshot(theirs)
    stage = make_stage(target)
    assert snapshot(mine) == before and snapshot(theirs) == theirs_before
    assert not (tmp_path / f".out.partial-{dead}-0badcafe").exists()
    assert not (tmp_path / f".out.staging-{dead}-00000000").exists()
    assert stage.is_dir() and (stage / ".retrain-stage").is_file()
    assert not list(tmp_path.glob(f".out.staging-{os.getpid()}-*"))


def test_the_final_move_checks_the_target_again(tmp_path):
    """A folder that became a user's between the check and the move is not replaced."""
    target = user_folder(tmp_path / "out")
    before = snapshot(target)
    stage = make_stage(target)
    (stage / "run.json").write_text("{}")
    with pytest.raises(OutputError, match="never replaces it"):
        replace_dir(stage, target, safety.MODEL)
    assert snapshot(target) == before
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        replace_dir(stage, link, safety.MODEL)
    assert snapshot(target) == before


# Every call that deletes, renames over or replaces a path, by file: (count, where it may act,
# and the test above that puts a user's folder there). A new one fails here until it is listed.
DELETING_CALLS = {
    "api.py": (1, "export: os.replace of a converted TFLite file over the same name in a retrain model "
                  "(refused when that name is not the tool's)", "export over a user's file"),
    "features/bottlenecks.py": (1, "a damaged shard set aside, only inside a tagged cache",
                                "test_cache_clear_removes_only_the_cache_files"),
    "features/cache_index.py": (2, "write_durably's own temporary file (shard, key file, index), renamed into place; "
                                   "the cache calls it only inside a tagged cache",
                                "test_cache_clear_removes_only_the_cache_files"),
    "files.py": (11, "staging folders with the stage mark; the earlier output after why_not_replaceable; "
                    "write_atomic's own temporary file", "test_staging_leftovers_are_removed_only_when_marked"),
    "safety.py": (2, "cache entry files with the cache's names, then the entry folder when empty",
                  "test_stale_temporaries_are_only_the_cache_own"),
}


def test_every_deleting_call_is_listed():
    pattern = re.compile(r"\brmtree\(|\.unlink\(|os\.replace\(|\.rename\(|os\.remove\(|\.rmdir\(|os\.unlink\(")
    found = {}
    for path in sorted((ROOT / "retrain").rglob("*.py")):
        count = sum(len(pattern.findall(line)) for line in path.read_text().splitlines()
                    if not line.lstrip().startswith("#"))
        if count:
            found[path.relative_to(ROOT / "retrain").as_posix()] = count
    assert found == {name: row[0] for name, row in DELETING_CALLS.items()}, found
    for name, (_, _, test) in DELETING_CALLS.items():
        assert test in SLIPS or test in globals(), test
