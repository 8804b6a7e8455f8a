"""Bad input ends in a correct result or one clear line, and loses nothing."""

import shutil

import pytest
from click.testing import CliRunner

import retrain
import retrain.pipeline
from retrain.cli import main
from retrain.errors import DatasetError
from retrain.features.module import TRUSTED_HOSTS, check_trusted

FAST = dict(epochs=30, learning_rate=0.05)


def _with_corrupt_reds(colour_dir, tmp_path, count):
    data = tmp_path / "data"
    shutil.copytree(colour_dir, data)
    for index in range(count):
        (data / "red" / f"broken_{index}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)) + bytes([index]))
    return data


def test_undecodable_files_are_listed_with_their_class(tiny_module, colour_dir, tmp_path):
    data = _with_corrupt_reds(colour_dir, tmp_path, 3)
    result = retrain.train(data, tiny_module, tmp_path / "out", cache_dir=str(tmp_path / "c"), **FAST)
    broken = [s for s in result.skipped if "broken_" in s["path"]]
    assert len(broken) == 3 and all(s["class"] == "red" and s["reason"] for s in broken)
    assert sum(result.split.values()) == 30


def test_too_many_undecodable_files_in_a_class_is_an_error(tiny_module, colour_dir, tmp_path):
    data = _with_corrupt_reds(colour_dir, tmp_path, 3)
    with pytest.raises(DatasetError, match=r"class red: 3 of 13 image files cannot be used \(limit 20%\)"):
        retrain.train(data, tiny_module, tmp_path / "out", cache_dir=str(tmp_path / "c"), max_unusable_fraction=0.2, **FAST)
    assert not (tmp_path / "out").exists()


def test_extra_trusted_host_is_explicit(tmp_path, monkeypatch):
    handle = "https://models.example.org/vision/feature_vector/3"
    with pytest.raises(retrain.RetrainError, match="--trust-host models.example.org"):
        check_trusted(handle)
    check_trusted(handle, trusted_hosts=TRUSTED_HOSTS + ("models.example.org",))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    result = CliRunner().invoke(main, ["module", "inspect", handle, "--trust-host", "models.example.org"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot download module") and len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_is_one_line_and_leaves_no_output(colour_dir, tiny_module, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain.pipeline, "fit_head", interrupted)
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "out"),
                                       "--cache-dir", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["Interrupted: nothing was written to the output folder."]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _layout(tmp_path, colour_dir, case):
    """Build the input for one bad case; returns the value of {input}."""
    import hashlib

    from tiny_modules import save_tiny_module

    root = tmp_path / case
    if case == "empty_folder":
        root.mkdir()
    elif case == "single_class":
        shutil.copytree(colour_dir / "red", root / "red")
    elif case in ("class_with_0_images", "class_with_1_image", "class_with_2_images"):
        shutil.copytree(colour_dir, root)
        keep = {"class_with_0_images": 0, "class_with_1_image": 1, "class_with_2_images": 2}[case]
        for path in sorted((root / "green").iterdir())[keep:]:
            path.unlink()
    elif case == "only_unusable_files":
        shutil.copytree(colour_dir, root)
        for path in (root / "green").iterdir():
            path.write_bytes(b"")
    elif case == "split_folders":
        shutil.copytree(colour_dir, root / "train")
        shutil.copytree(colour_dir, root / "validation")
    elif case in ("logits", "map", "any_size"):
        return save_tiny_module(root, output="vector" if case == "any_size" else case, variable_size=case == "any_size")
    elif case == "not_a_saved_model":
        root.mkdir()
        (root / "model.h5").write_bytes(b"\x89HDF")
    elif case == "damaged_hub_entry":
        handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_035_224/feature_vector/5"
        entry = tmp_path / "hub" / hashlib.sha1(handle.encode()).hexdigest()
        entry.mkdir(parents=True)
        (entry / "saved_model.pb").write_bytes(b"garbage")
        return handle
    elif case == "existing_output":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    return str(root)


TRAIN = ["train", "{data}", "--module", "{module}", "--output", "{out}", "--cache-dir", "{tmp}/c", "--epochs", "3"]
USER_ERRORS = {
    # case: (arguments, the message's key words)
    "empty_folder": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "has no class sub-folders"),
    "single_class": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "at least 2 are needed"),
    "class_with_0_images": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "green"),
    "class_with_1_image": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "green"),
    "class_with_2_images": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "green"),
    "only_unusable_files": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "0 usable image(s) (10 unusable, e.g. "),
    "split_folders": (["train", "{input}", "--module", "{module}", "--output", "{out}"], "--validation-dir"),
    "logits": (["train", "{data}", "--module", "{input}", "--output", "{out}"], "feature_vector module is needed"),
    "map": (["train", "{data}", "--module", "{input}", "--output", "{out}"], "not a feature vector"),
    "any_size": (["train", "{data}", "--module", "{input}", "--output", "{out}"], "--image-size"),
    "not_a_saved_model": (["train", "{data}", "--module", "{input}", "--output", "{out}"], "is not a SavedModel"),
    "wrong_size": ([*TRAIN, "--image-size", "64"], "needs 32x32 images"),
    "unversioned_url": (["train", "{data}", "--module", "https://tfhub.dev/google/x/feature_vector", "--output", "{out}"], "--allow-unversioned"),
    "offline_download": (["train", "{data}", "--module", "https://tfhub.dev/google/x/feature_vector/5", "--output", "{out}"], "cannot download module"),
    "damaged_hub_entry": (["train", "{data}", "--module", "{input}", "--output", "{out}"], "is damaged"),
    "existing_output": (["train", "{data}", "--module", "{module}", "--output", "{input}"], "never replaces it, even with --overwrite"),
    "report_folder_not_empty": (["evaluate", "{tmp}/nomodel", "{data}", "--report", "{input}"], "never replaces it, even with --overwrite"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_every_user_error_is_one_line_exit_1_and_writes_nothing(case, tiny_module, colour_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    args, message = USER_ERRORS[case]
    value = _layout(tmp_path, colour_dir, "existing_output" if case == "report_folder_not_empty" else case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    values = {"input": value, "module": tiny_module, "data": str(colour_dir), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    scratch = (tmp_path / "c", tmp_path / "hub")  # the bottleneck cache and TF Hub's cache folder
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not any(p.is_relative_to(s) for s in scratch))
    assert after == [p for p in before if not any((tmp_path / p).is_relative_to(s) for s in scratch)]
    if case == "offline_download":  # no partial download or lock file left behind
        assert not [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]


def test_unicode_spaces_and_quotes_in_names(tiny_module, colour_dir, tmp_path):
    import json

    names = {"blue": 'bleu "ciel"', "green": "vert 🌿 d'été", "red": "rouge vif"}
    data = tmp_path / "mes données ' \""
    for source, name in names.items():
        for index, path in enumerate(sorted((colour_dir / source).iterdir())):
            (data / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / name / f"photo n°{index} 'été' \"x\".jpg")
    out = tmp_path / "sortie é"
    result = CliRunner().invoke(main, ["train", str(data), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                       str(tmp_path / "c"), "--json", "--epochs", "30", "--learning-rate", "0.05"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes"] == sorted(names.values())
    assert (out / "labels.txt").read_text(encoding="utf-8").splitlines() == sorted(names.values())
    image = data / names["green"] / "photo n°3 'été' \"x\".jpg"
    predicted = CliRunner().invoke(main, ["predict", str(out / "model.tflite"), str(image), "--json"])
    assert predicted.exit_code == 0, predicted.output
    line = json.loads(predicted.stdout)
    assert line["path"] == str(image) and line["top"][0]["class"] == names["green"]
