"""``retrain extract``: bottlenecks from an Apache Beam pipeline, read by ``retrain train`` with no image work.

The pipeline runs on Beam's Python DirectRunner: in this process for the small checks, and with
two worker processes (``--workers 2``: multi_processing) where the split over processes matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, cached_vectors, finish_json, same_tflite_model
from tiny_modules import save_tiny_module, write_colour_images
from retrain.cli import main

COUNTS = {"blue": 20, "green": 20, "red": 20}
SLOW_COUNTS = {"blue": 80, "green": 80, "red": 80}  # 240 images: 30 module calls of 8 on the slow module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    module = save_tiny_module(root / "tiny")
    images = write_colour_images(root / "images", counts=COUNTS, seed=3)
    return module, images


def _run(*args, **popen):
    command = [sys.executable, "-m", "retrain", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _extract_in_process(images, module, cache, *extra) -> dict:
    result = CliRunner().invoke(main, ["extract", str(images), "--module", str(module), "--cache-dir", str(cache),
                                       "--batch-size", "8", "--shard-size", "16", "--json", *map(str, extra)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _shards(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*/*.npz") if not p.name.startswith("."))


TRAIN_ARGS = ["--quantize", "none", "--json"]


def test_two_worker_processes_then_train_reads_every_vector_from_the_cache(setup, tmp_path):
    module, images = setup
    extracted = finish_json(_run("extract", images, "--module", module, "--cache-dir", tmp_path / "beam", "--workers", "2",
                             "--batch-size", "8", "--shard-size", "16", "--json"))
    total = sum(COUNTS.values())
    assert (extracted["images"], extracted["computed"], extracted["already_cached"]) == (total, total, 0)
    assert extracted["workers"] == 2 and extracted["processes"] == 2  # both processes loaded the module and computed
    assert extracted["skipped"] == [] and extracted["shards"] == len(_shards(tmp_path / "beam"))
    assert Path(extracted["cache_dir"]).parent == (tmp_path / "beam").resolve()

    with_beam = finish_json(_run("train", images, "--module", module, "--cache-dir", tmp_path / "beam",
                             "--output", tmp_path / "out-beam", *TRAIN_ARGS))
    assert (with_beam["cache"]["hits"], with_beam["cache"]["misses"]) == (total, 0)
    by_itself = finish_json(_run("train", images, "--module", module, "--cache-dir", tmp_path / "alone",
                             "--output", tmp_path / "out-alone", *TRAIN_ARGS))
    assert by_itself["cache"]["misses"] == total
    beam_vectors = cached_vectors(tmp_path / "beam", unique_keys=True)
    own_vectors = cached_vectors(tmp_path / "alone", unique_keys=True)
    assert sorted(beam_vectors) == sorted(own_vectors)
    worst = max(float(np.abs(beam_vectors[k] - own_vectors[k]).max()) for k in own_vectors)
    assert worst <= 1e-5, worst
    assert with_beam["metrics"]["test"] == by_itself["metrics"]["test"]
    assert with_beam["split"] == by_itself["split"]
    same_tflite_model(tmp_path / "out-beam", tmp_path / "out-alone", atol=1e-4)

    again = _extract_in_process(images, module, tmp_path / "beam")
    assert (again["computed"], again["already_cached"], again["shards"], again["processes"]) == (0, total, 0, 0)
    assert len(cached_vectors(tmp_path / "beam", unique_keys=True)) == total


def _kill_group_when(process, happened, what: str, timeout: float = 240) -> None:
    """SIGKILL the command and its worker processes (its own process group) once ``happened()``."""
    deadline = time.monotonic() + timeout
    while not happened():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def test_killed_halfway_then_rerun_computes_only_what_is_missing(tmp_path):
    module = save_tiny_module(tmp_path / "slow", work=100)  # about 0.1 s per module call
    images = write_colour_images(tmp_path / "images", counts=SLOW_COUNTS, seed=5)
    cache = tmp_path / "cache"
    args = ["extract", images, "--module", module, "--cache-dir", cache, "--workers", "2", "--batch-size", "8",
            "--shard-size", "8", "--json"]
    _kill_group_when(_run(*args, start_new_session=True), lambda: _shards(cache), "first shard")
    kept = cached_vectors(cache, unique_keys=True)  # every shard there is whole
    total = sum(SLOW_COUNTS.values())
    assert 0 < len(kept) < total, "the kill did not land during extraction"

    rerun = finish_json(_run(*args))
    assert rerun["already_cached"] == len(kept)
    assert rerun["computed"] == total - len(kept)
    after = cached_vectors(cache, unique_keys=True)  # no key in two shards: nothing already written was computed again
    assert sorted(after) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in images.glob("*/*.jpg"))
    for key, vector in kept.items():
        np.testing.assert_array_equal(after[key], vector)


def test_skipped_files_are_listed_with_their_reasons(setup, tmp_path):
    module, _ = setup
    images = write_colour_images(tmp_path / "images", counts={"blue": 3, "red": 3}, seed=7)
    (images / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (images / "red" / "empty.png").write_bytes(b"")
    (images / "blue" / "notes.txt").write_text("not an image")
    (images / "stray.jpg").write_bytes((images / "red" / "red_7_0.jpg").read_bytes())
    (images / "blue" / "copy.jpg").write_bytes((images / "blue" / "blue_7_0.jpg").read_bytes())
    result = _extract_in_process(images, module, tmp_path / "cache")
    reasons = {Path(item["path"]).name: item["reason"] for item in result["skipped"]}
    assert reasons == {
        "broken.jpg": reasons["broken.jpg"],
        "empty.png": "empty file",
        "notes.txt": "not an image file extension (.txt)",
        "stray.jpg": "not inside a class folder",
    }
    assert reasons["broken.jpg"]  # Pillow's own words
    assert result["skipped_total"] == 4
    # images: the 6, the copy and the two that cannot be decoded; the copy is computed once
    assert (result["images"], result["computed"], result["duplicates"]) == (9, 6, 1)
    assert len(cached_vectors(tmp_path / "cache", unique_keys=True)) == 6


def test_a_refused_module_fails_before_any_image_is_read(setup, tmp_path, monkeypatch):
    import retrain.features.beam as beam_extract

    _, images = setup

    def read(*_):
        raise AssertionError("an image was looked at")

    monkeypatch.setattr(beam_extract, "list_inputs", read)
    monkeypatch.setattr(beam_extract.steps, "read_file", read)
    result = CliRunner().invoke(main, ["extract", str(images), "--module", "https://models.example.com/m/1",
                                       "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: module host models.example.com is not trusted (modules are executed code); trusted: tfhub.dev, "
        "www.kaggle.com, kaggle.com; pass --trust-host models.example.com if you trust it"]
    assert not list((tmp_path / "cache").glob("*/*.npz"))


def test_a_worker_refuses_a_module_whose_files_differ(setup, tmp_path):
    from retrain.errors import ModuleError
    from retrain.features.beam.steps import ModuleSpec, load_for_extraction

    module, _ = setup
    spec = ModuleSpec(module, None, False, (), (), str(tmp_path), "0" * 64)
    with pytest.raises(ModuleError, match="every worker must load the same files"):
        load_for_extraction(spec)


def test_globs_and_file_lists(setup, tmp_path):
    module, images = setup
    by_glob = _extract_in_process(f"{images}/red/*.jpg", module, tmp_path / "glob")
    assert (by_glob["images"], by_glob["computed"]) == (COUNTS["red"], COUNTS["red"])
    listing = tmp_path / "list.txt"
    blue = sorted((images / "blue").iterdir())
    listing.write_text("# two images, one by a relative path\n\n" + f"{blue[0]}\n"
                       + os.path.relpath(blue[1], tmp_path) + "\n")
    by_list = _extract_in_process(listing, module, tmp_path / "glob")
    assert (by_list["images"], by_list["computed"]) == (2, 2)


def test_shards_for_an_object_store_have_the_cache_format(tmp_path):
    from retrain.features.beam.steps import write_remote_shard
    from retrain.features.bottlenecks import BottleneckCache

    cache = BottleneckCache(tmp_path, "f" * 64, "key")
    cache.dir.mkdir(parents=True)
    vectors = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    write_remote_shard(str(cache.dir), ["a" * 64, "b" * 64, "c" * 64], vectors)  # through FileSystems
    found = cache.lookup(["a" * 64, "c" * 64])
    np.testing.assert_array_equal(found["c" * 64], vectors[2])
    assert cache.corrupt == []


def test_without_apache_beam_one_line_says_how_to_get_it(setup, monkeypatch):
    module, images = setup
    for name in [name for name in sys.modules if name.startswith("retrain.features.beam")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam now fails
    result = CliRunner().invoke(main, ["extract", str(images), "--module", module])
    assert result.exit_code == 1
    assert result.output == "Error: retrain extract needs Apache Beam: pip install 'retrain[beam]'\n"


# --- other runners: the README's flags, parsed as Beam parses them (nothing is run) -----------------


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n### Extracting on many machines\n")
    section = text[start:text.find("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        commands += [shlex.split(line, comments=True) for line in joined.splitlines() if line.startswith("retrain extract")]
    return commands


def test_the_readme_flags_for_dataflow_flink_and_spark_parse():
    from apache_beam.options.pipeline_options import (FlinkRunnerOptions, GoogleCloudOptions, PortableOptions,
                                                      SetupOptions, SparkRunnerOptions)

    from retrain.features.beam.options import pipeline_options

    runners = {}
    for words in _readme_commands():
        context = main.commands["extract"].make_context("extract", words[2:])  # retrain's own options
        params = context.params
        options = pipeline_options(params["runner"], params["workers"], params["beam_args"])
        runners[params["runner"]] = options
        assert options.view_as(GoogleCloudOptions).temp_location  # where the workers list skipped files
    assert {"DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner"} <= set(runners)
    cloud = runners["DataflowRunner"].view_as(GoogleCloudOptions)
    assert cloud.project and cloud.region and cloud.temp_location.startswith("gs://")
    assert runners["DataflowRunner"].view_as(SetupOptions).extra_packages[0].endswith(".whl")
    assert runners["FlinkRunner"].view_as(FlinkRunnerOptions).flink_master
    assert runners["FlinkRunner"].view_as(PortableOptions).environment_type == "EXTERNAL"
    assert runners["SparkRunner"].view_as(SparkRunnerOptions).spark_master_url.startswith("spark://")
    assert runners["PortableRunner"].view_as(PortableOptions).job_endpoint


@pytest.mark.parametrize("runner, workers, args, message", [
    ("DataflowRunner", None, ["--projekt", "p"], "unknown Beam pipeline option --projekt"),
    ("DirectRunner", None, ["--direct_num_workers", "two"], "invalid int value: 'two'"),
    ("DirectRunner", None, ["--runner", "DataflowRunner"], "give the runner as retrain's --runner option"),
    ("DataflowRunner", 4, [], "--workers is for the DirectRunner"),
    ("DirectRunner", 2, ["--direct_num_workers=3"], "give one or the other"),
    ("DirectRunner", None, ["--direct_num_workers=3"], "needs --direct_running_mode multi_processing"),
])
def test_pipeline_option_mistakes_are_one_line_errors(runner, workers, args, message):
    from retrain.errors import ConfigError
    from retrain.features.beam.options import pipeline_options

    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline_options(runner, workers, args)


def test_a_remote_runner_needs_a_temp_location(setup, tmp_path):
    module, images = setup
    common = ["extract", str(images), "--module", module, "--cache-dir", str(tmp_path / "cache"), "--runner"]
    result = CliRunner().invoke(main, common + ["FlinkRunner", "--", "--flink_master", "localhost:8081"])
    assert result.exit_code == 1
    assert "Error: FlinkRunner needs --temp_location after --" in result.output
    result = CliRunner().invoke(main, common + ["FlinkRunner", "--", "--temp_location", "nosuchfs://tmp"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: nosuchfs://tmp: Unable to get filesystem from specified path")


def test_a_failing_step_is_one_error_line(setup, tmp_path, monkeypatch):
    import retrain.features.beam as beam_extract
    from retrain.errors import ModuleError

    def fail(self, batch):
        raise ModuleError("module M has fingerprint aaa on this worker but bbb where the pipeline started")

    monkeypatch.setattr(beam_extract.Embed, "process", fail)
    module, images = setup
    result = CliRunner().invoke(main, ["extract", str(images), "--module", module, "--cache-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: module M has fingerprint aaa on this worker"), lines
