"""Bad input ends in a correct result or one clear line, and loses nothing."""

import shutil

import pytest
from click.testing import CliRunner

import retrain
import retrain.api
from retrain.cli import main
from retrain.errors import DatasetError
from retrain.module import TRUSTED_HOSTS, check_trusted

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

    monkeypatch.setattr(retrain.api, "train_head", interrupted)
    result = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(tmp_path / "out"),
                                       "--cache-dir", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["Interrupted: nothing was written to the output folder."]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
