"""The command line: JSON contract, one-line errors and exit codes, thin wrappers over the API."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrain.cli import main

FAST = ["--epochs", "40", "--learning-rate", "0.05"]


@pytest.fixture(scope="module")
def cli_out(tiny_module, colour_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    cache = tmp_path_factory.mktemp("cli-cache")
    result = CliRunner().invoke(
        main,
        ["train", str(colour_dir), "--module", tiny_module, "--output", str(out), "--cache-dir", str(cache), "--json", *FAST],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out, cache, result


def test_train_json_is_the_only_stdout(cli_out):
    _, _, result = cli_out
    data = json.loads(result.stdout)  # fails if anything but JSON is on stdout
    for key in ("classes", "split", "metrics", "timings", "cache", "skipped", "artifacts"):
        assert key in data
    assert data["classes"] == ["blue", "green", "red"]
    assert set(data["timings"]) >= {"scan", "bottlenecks", "train", "export"}
    assert data["cache"]["misses"] == 30
    assert data["metrics"]["test"]["accuracy"] == 1.0


def test_second_identical_run_needs_overwrite_and_hits_the_cache(cli_out, tiny_module, colour_dir):
    out, cache, _ = cli_out
    args = ["train", str(colour_dir), "--module", tiny_module, "--output", str(out), "--cache-dir", str(cache), "--json", *FAST]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused = CliRunner().invoke(main, args, catch_exceptions=False)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == f"Error: output folder {out} holds an earlier model: pass --overwrite to replace it"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    result = CliRunner().invoke(main, [*args, "--overwrite"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["cache"]["hits"], data["cache"]["misses"]) == (30, 0)


def test_human_output_names_accuracy_and_paths(tiny_module, colour_dir, tmp_path):
    out = tmp_path / "human"
    result = CliRunner().invoke(
        main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--cache-dir", str(tmp_path / "c"), "-q", *FAST],
        catch_exceptions=False,
    )
    assert result.exit_code == 0
    assert "test accuracy: 1.0000" in result.stdout
    assert f"model: {out}" in result.stdout
    assert str(out / "model.tflite") in result.stdout


def test_evaluate_json(cli_out, colour_dir):
    out, _, _ = cli_out
    result = CliRunner().invoke(main, ["evaluate", str(out / "model.tflite"), str(colour_dir), "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["n_images"] == 30 and data["classes"] == ["blue", "green", "red"]
    assert set(data["per_class"]["red"]) == {"precision", "recall", "f1", "support"}
    assert len(data["confusion_matrix"]) == 3 and sum(map(sum, data["confusion_matrix"])) == 30
    assert data["skipped"] == []


def test_evaluate_table(cli_out, colour_dir):
    out, _, _ = cli_out
    result = CliRunner().invoke(main, ["evaluate", str(out), str(colour_dir)], catch_exceptions=False)
    assert result.exit_code == 0
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout


def test_predict_json_lines(cli_out, colour_dir, tmp_path):
    out, _, _ = cli_out
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    image = next((colour_dir / "blue").iterdir())
    result = CliRunner().invoke(main, ["predict", str(out), str(image), str(broken), "--top-k", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["top"][0]["class"] == "blue" and len(lines[0]["top"]) == 2
    assert lines[1]["error"] and lines[1]["top"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{missing}", "--module", "{module}", "--output", "{tmp}/o"], "does not exist"),
        (["train", "{data}", "--module", "{tmp}/nomodule", "--output", "{tmp}/o"], "does not exist"),
        (["train", "{data}", "--module", "https://evil.example.com/m/1", "--output", "{tmp}/o"], "not trusted"),
        (["train", "{data}", "--module", "{module}", "--output", "{tmp}/o", "--test-percent", "95"], "leave images for training"),
        (["evaluate", "{tmp}/nomodel", "{data}"], "does not exist"),
        (["predict", "{tmp}/nomodel.tflite", "x.jpg"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_exit_1(args, message, tiny_module, colour_dir, tmp_path):
    values = {"missing": str(tmp_path / "missing"), "module": tiny_module, "tmp": str(tmp_path), "data": str(colour_dir)}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_usage_error_is_exit_2():
    result = CliRunner().invoke(main, ["train", "--epochs", "x"])
    assert result.exit_code == 2


def test_module_inspect_and_cache_commands(tiny_module, cli_out):
    _, cache, _ = cli_out
    runner = CliRunner()
    result = runner.invoke(main, ["module", "inspect", tiny_module, "--json"], catch_exceptions=False)
    assert json.loads(result.stdout)["feature_dim"] == 8
    info = json.loads(runner.invoke(main, ["cache", "info", "--cache-dir", str(cache), "--json"]).stdout)
    assert info["entries"][0]["vectors"] == 30
    cleared = runner.invoke(main, ["cache", "clear", "--cache-dir", str(cache), "--yes"])
    assert cleared.exit_code == 0
    assert json.loads(runner.invoke(main, ["cache", "info", "--cache-dir", str(cache), "--json"]).stdout)["entries"] == []


def test_help_does_not_import_tensorflow():
    code = "import sys; from retrain.cli import main; sys.argv=['retrain','--help']\ntry: main()\nexcept SystemExit: pass\nprint('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


@pytest.mark.subprocess
def test_console_script_and_module_entry_point(tmp_path):
    for command in ([sys.executable, "-m", "retrain", "--version"],):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0 and "retrain" in result.stdout


@pytest.mark.subprocess
def test_prompt_exit_keeps_exit_codes_and_output(tiny_module, colour_dir, tmp_path):
    """The program ends without the interpreter's teardown: exit codes, stdout and the output
    folder must be exactly what ``main`` produced."""
    def retrain(*args):
        return subprocess.run([sys.executable, "-m", "retrain", *args], capture_output=True, text=True)

    failed = retrain("train", str(tmp_path / "missing"), "--module", tiny_module, "--output", str(tmp_path / "o"))
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [f"Error: image folder {tmp_path / 'missing'} does not exist"]
    assert retrain("no-such-command").returncode == 2
    out = tmp_path / "out"
    trained = retrain("train", str(colour_dir), "--module", tiny_module, "--output", str(out), "--cache-dir",
                      str(tmp_path / "cache"), "--json", "--quantize", "none", *FAST)
    assert trained.returncode == 0, trained.stderr
    data = json.loads(trained.stdout)  # complete: flushed before the process ended
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in data["artifacts"].values())


def test_readme_measurement_commands_use_real_options():
    """The README's measured runs of --augment / --fine-tune / --class-weight stay valid commands."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- the options of each line below are checked by tests/test_cli.py -->", 1)[1].split("```", 2)[1]
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("retrain ")]
    assert len(commands) >= 3
    for args in commands:
        command = main.get_command(None, args[1])
        command.make_context(args[1], args[2:])  # parses and checks every option; runs nothing
