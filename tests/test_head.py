"""The head: a cross-validated logistic regression checked against scikit-learn, honest accuracy
figures (count and 95 % interval), --min-accuracy, and likely label errors."""

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from retrain.training import head as head_module
from retrain.training import logistic
from retrain.cli import main
from retrain.config import TrainConfig
from retrain.errors import ConfigError
from retrain.evaluation.evaluate import wilson_interval
from retrain.training.head import choose_solver, fit_head
from retrain.training.logistic import C_GRID
from tiny_modules import save_pooling_module, write_colour_images, write_one_pixel_colour_images


def blobs(n_per_class, n_classes, dim=16, spread=2.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(scale=spread, size=(len(y), dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize("n_classes, per_class, dim", [(2, 15, 16), (4, 15, 16), (2, 8, 64), (3, 6, 64)])
def test_the_head_is_scikit_learn_logistic_regression_at_the_chosen_c(n_classes, per_class, dim, monkeypatch):
    """Also with fewer vectors than dimensions, where the head solves in their span: solved
    tightly, both give the same probabilities (the construction is exact, not only close). With
    more vectors than dimensions the head solves in float32, which bounds how close it gets."""
    from sklearn.linear_model import LogisticRegression

    monkeypatch.setattr(logistic, "TOLERANCE", 1e-10)
    monkeypatch.setattr(logistic, "MAX_ITERATIONS", 100_000)
    x, y = blobs(per_class, n_classes, dim=dim)
    head = fit_head(x, y, None, None, n_classes, TrainConfig())
    assert head.solver == "logistic" and head.cross_validation["c"] in C_GRID
    reference = LogisticRegression(C=head.cross_validation["c"], max_iter=100_000, tol=1e-10).fit(x.astype(np.float64), y)
    probe, _ = blobs(20, n_classes, dim=dim, seed=1)
    in_span = n_classes * per_class < dim
    np.testing.assert_allclose(head.probabilities(probe), reference.predict_proba(probe.astype(np.float64)),
                               atol=1e-5 if in_span else 1e-3)  # float32 stops short of 1e-10: 2e-4 seen


def test_cross_validated_accuracy_per_c_matches_an_independent_computation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = blobs(12, 3, spread=3.0)
    head = fit_head(x, y, None, None, 3, TrainConfig(seed=7))
    cv = head.cross_validation
    assert cv["folds"] == 5 and cv["n_images"] == len(y)
    for c, ours in zip(C_GRID, cv["accuracy_per_c"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predicted = cross_val_predict(LogisticRegression(C=c, max_iter=1000), x.astype(np.float64), y,
                                          cv=StratifiedKFold(5, shuffle=True, random_state=7))
        assert abs(ours - (predicted == y).mean()) <= 1 / len(y) + 1e-9, c  # warm starts may move one borderline image
    best = max(cv["accuracy_per_c"])
    assert cv["accuracy"] == pytest.approx(best, abs=1e-6)
    tied = [i for i, a in enumerate(cv["accuracy_per_c"]) if a == pytest.approx(best, abs=1e-6)]
    assert C_GRID.index(cv["c"]) == min(tied)  # ties go to the strongest regularization, as LogisticRegressionCV
    assert head.out_of_fold.shape == (len(y), 3)
    np.testing.assert_allclose(head.out_of_fold.sum(axis=1), 1.0, atol=1e-5)


def _noisy_three_classes(per_class=100, dim=64):
    """Three classes apart in 3 of ``dim`` dimensions: weaker regularization fits the noise."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), per_class)
    x = rng.normal(size=(len(y), dim))
    x[:, :3] += np.eye(3)[y]
    return x.astype(np.float32), y


def test_the_c_path_stops_once_it_has_clearly_turned_with_the_whole_grid_s_choice(monkeypatch):
    x, y = _noisy_three_classes()
    short = fit_head(x, y, None, None, 3, TrainConfig())
    cv = short.cross_validation
    assert cv["path_stopped"] and len(cv["grid"]) < len(C_GRID)
    assert len(cv["accuracy_per_c"]) == len(cv["log_loss_per_c"]) == len(cv["grid"])
    monkeypatch.setattr(logistic, "_path_has_turned", lambda *scores: False)  # the whole grid
    whole = fit_head(x, y, None, None, 3, TrainConfig())
    assert not whole.cross_validation["path_stopped"] and whole.cross_validation["grid"] == list(C_GRID)
    assert whole.cross_validation["accuracy_per_c"][:len(cv["grid"])] == cv["accuracy_per_c"]  # the same fits
    assert whole.cross_validation["c"] == cv["c"]
    np.testing.assert_array_equal(whole.kernel, short.kernel)
    np.testing.assert_array_equal(whole.out_of_fold, short.out_of_fold)


def test_the_path_turns_only_on_clearly_worse_cs():
    turned = logistic._path_has_turned
    n = 200
    best = np.ones(n, bool)
    best[:40] = False  # 0.8
    worse = best.copy()
    worse[40:70] = False  # 30 more images wrong: McNemar z = 30 / sqrt(30) > 2
    slightly = best.copy()
    slightly[40:43] = False  # 3 more wrong: z = 1.7
    rising = np.array([0.5, 0.6, 0.7])
    assert turned(np.stack([best, worse, worse]), rising)
    assert not turned(np.stack([best, worse]), rising[:2])  # one C after the best is not two
    assert not turned(np.stack([best, slightly, slightly]), rising)  # within chance
    assert not turned(np.stack([best, worse, worse]), np.array([0.5, 0.6, 0.4]))  # log loss still falling
    assert not turned(np.stack([best, worse, best]), rising)  # back to the best


def test_a_failing_fit_stops_the_path_and_is_raised(monkeypatch):
    calls = []

    def failing(model, x, n_classes):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("solver failed")
        return np.full((len(x), n_classes), 1.0 / n_classes)

    monkeypatch.setattr(logistic, "_full_probabilities", failing)
    x, y = blobs(12, 3)
    with pytest.raises(RuntimeError, match="solver failed"):
        fit_head(x, y, None, None, 3, TrainConfig())
    assert len(calls) < 5 * len(C_GRID)  # the other folds stopped instead of running their paths out


def test_the_best_c_moves_with_the_amount_of_data():
    """One informative feature of small scale among noise: a few vectors call for strong
    regularization (the noise would be fitted), many for weak (the small feature needs a large weight)."""

    def data(n, seed):
        rng = np.random.default_rng(seed)
        y = np.repeat([0, 1], n)
        x = rng.normal(size=(2 * n, 32))
        x[:, 0] = (2 * y - 1) * 0.1 + rng.normal(scale=0.08, size=2 * n)
        return x.astype(np.float32), y

    for seed in range(3):
        few = fit_head(*data(5, seed), None, None, 2, TrainConfig())
        many = fit_head(*data(400, seed), None, None, 2, TrainConfig())
        assert few.cross_validation["c"] <= 0.1 < 1.0 <= many.cross_validation["c"], seed


def test_deterministic_for_a_seed_and_copies_share_a_fold():
    x, y = blobs(10, 3)
    first = fit_head(x, y, None, None, 3, TrainConfig(seed=3))
    again = fit_head(x, y, None, None, 3, TrainConfig(seed=3))
    np.testing.assert_array_equal(first.kernel, again.kernel)
    copies = np.concatenate([x, x + 0.01])
    groups = np.concatenate([np.arange(len(y)), np.arange(len(y))])
    grouped = fit_head(copies, np.concatenate([y, y]), None, None, 3, TrainConfig(seed=3), groups=groups)
    assert grouped.cross_validation["n_images"] == len(y) and grouped.out_of_fold.shape == (len(y), 3)


def test_folds_on_several_threads_give_what_one_thread_gives(monkeypatch):
    """The folds run on one thread per core: the same kernel, C and figures as one after the other,
    and the ConvergenceWarnings the worker threads raise are still counted."""
    x, y = blobs(40, 3, dim=48, spread=3.0)
    monkeypatch.setattr(logistic, "cpu_cores", lambda: 1)
    alone = fit_head(x, y, None, None, 3, TrainConfig(seed=5))
    monkeypatch.setattr(logistic, "cpu_cores", lambda: 4)
    threads = []
    real_pool = logistic.ThreadPoolExecutor

    def counting_pool(**kwargs):
        threads.append(kwargs["max_workers"])
        return real_pool(**kwargs)

    monkeypatch.setattr(logistic, "ThreadPoolExecutor", counting_pool)
    together = fit_head(x, y, None, None, 3, TrainConfig(seed=5))
    assert threads == [4]
    np.testing.assert_array_equal(alone.kernel, together.kernel)
    np.testing.assert_array_equal(alone.out_of_fold, together.out_of_fold)
    assert alone.cross_validation == together.cross_validation
    monkeypatch.setattr(logistic, "MAX_ITERATIONS", 1)
    assert fit_head(x, y, None, None, 3, TrainConfig(seed=5)).cross_validation["converged"] is False


def test_the_solver_is_imported_ahead_unless_the_head_is_the_minibatch_one():
    import sys

    assert logistic.import_solver_ahead("minibatch") is None
    thread = logistic.import_solver_ahead("auto")
    thread.join(timeout=60)
    assert not thread.is_alive() and "sklearn.linear_model" in sys.modules and "sklearn.model_selection" in sys.modules


def test_the_solver_is_chosen_by_size(monkeypatch):
    assert choose_solver("auto", head_module.FULL_BATCH_MAX_VECTORS) == "logistic"
    assert choose_solver("auto", head_module.FULL_BATCH_MAX_VECTORS + 1) == "minibatch"
    assert choose_solver("logistic", 10 ** 9) == "logistic"
    monkeypatch.setattr(head_module, "FULL_BATCH_MAX_VECTORS", 10)
    x, y = blobs(10, 2)
    head = fit_head(x, y, x[:4], y[:4], 2, TrainConfig(epochs=3))
    assert head.solver == "minibatch" and head.epochs_run == 3
    with pytest.raises(ConfigError, match="--head must be one of auto, logistic, minibatch"):
        TrainConfig(head="lbfgs")


def test_wilson_interval_against_published_values():
    # Wilson score intervals (z = 1.96) as tabulated by Newcombe (1998) and statsmodels' proportion_confint
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)


@pytest.fixture(scope="module")
def pooling_module(tmp_path_factory):
    return save_pooling_module(tmp_path_factory.mktemp("modules") / "pooling")


def test_three_solid_colours_with_a_pooling_module_reach_1_with_defaults(pooling_module, tmp_path):
    """The old TF Hub tool's end-to-end case: 3-dimensional features, each image one pixel off."""
    data = write_one_pixel_colour_images(tmp_path / "colours")
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["train", str(data), "-m", pooling_module, "-o", str(out),
                                     "--cache-dir", str(tmp_path / "c"), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["metrics"]["test"]["accuracy"] == 1.0
    assert result["metrics"]["cross_validation"]["accuracy"] == 1.0
    assert result["metrics"]["tflite"]["float32"]["accuracy"] == 1.0
    predicted = CliRunner().invoke(main, ["predict", str(out / "model.tflite"), str(data / "green" / "green_3.png")])
    assert predicted.stdout.startswith(f"{data / 'green' / 'green_3.png'}: green ")


def test_every_accuracy_carries_its_count_and_interval(tiny_module, colour_dir, tmp_path):
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["train", str(colour_dir), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                     str(tmp_path / "c"), "--json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    figures = [result["metrics"]["test"], result["metrics"]["cross_validation"], *result["metrics"]["tflite"].values()]
    for row in figures:
        low, high = row["accuracy_interval"]
        assert row["n_images"] > 0 and low <= row["accuracy"] <= high
    n_test = result["metrics"]["test"]["n_images"]
    assert any(f"only {n_test} test images: too few to tell models apart" in w for w in result["warnings"]), result["warnings"]
    run = json.loads((out / "run.json").read_text())
    assert run["head"]["cross_validation"]["c"] == result["metrics"]["cross_validation"]["c"]
    assert json.loads((out / "metrics.json").read_text())["test"]["accuracy_interval"] == figures[0]["accuracy_interval"]
    evaluated = CliRunner().invoke(main, ["evaluate", str(out), str(colour_dir), "--json"], catch_exceptions=False)
    data = json.loads(evaluated.stdout)
    assert data["n_images"] == 30 and data["accuracy_interval"] == wilson_interval(round(30 * data["accuracy"]), 30)
    text = CliRunner().invoke(main, ["evaluate", str(out), str(colour_dir)], catch_exceptions=False)
    assert "accuracy 1.0000 (95% CI 0.886-1.000, 30 images)" in text.stdout


def test_min_accuracy_exits_1_and_keeps_the_earlier_model(tiny_module, tmp_path):
    # noise images: the classes cannot be told apart, so the test accuracy is low
    rng = np.random.default_rng(0)
    from PIL import Image

    data = tmp_path / "noise"
    for name in ("a", "b", "c"):
        (data / name).mkdir(parents=True)
        for index in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / name / f"{index}.png")
    out = tmp_path / "out"
    args = ["train", str(data), "-m", tiny_module, "-o", str(out), "--cache-dir", str(tmp_path / "c"),
            "--quantize", "none", "--test-percent", "30"]
    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = CliRunner().invoke(main, [*args, "--overwrite", "--min-accuracy", "0.99", "--quiet"])
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: test accuracy ") and \
        f"is below --min-accuracy 0.99: nothing was written to {out}" in lines[0], refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    passed = CliRunner().invoke(main, [*args, "--overwrite", "--min-accuracy", "0"], catch_exceptions=False)
    assert passed.exit_code == 0
    bad = CliRunner().invoke(main, [*args, "--overwrite", "--min-accuracy", "95"])
    assert bad.exit_code == 1 and "--min-accuracy must be in [0, 1], got 95" in bad.stderr


def test_photos_in_the_wrong_folder_are_listed_as_likely_label_errors(tiny_module, tmp_path):
    data = write_colour_images(tmp_path / "colours", counts={"blue": 12, "green": 12, "red": 12}, seed=5)
    moved = sorted((data / "red").iterdir())[:2]
    for path in moved:
        shutil.move(path, data / "blue" / path.name)
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["train", str(data), "-m", tiny_module, "-o", str(out), "--cache-dir",
                                     str(tmp_path / "c"), "--quantize", "none", "--test-percent", "0"],
                              catch_exceptions=False)
    assert done.exit_code == 0, done.output
    run = json.loads((out / "run.json").read_text())
    flagged = {e["path"]: e for e in run["label_errors"]}
    for path in moved:
        entry = flagged[str(data / "blue" / path.name)]
        assert entry["class"] == "blue" and entry["looks_like"] == "red" and entry["confidence"] >= entry["threshold"]
    assert len(flagged) <= 4  # the moved photos, not the folder
    assert f"likely label errors: {len(flagged)} (" in done.stdout
    page = (out / "label_errors.html").read_text()
    assert all(path.name in page for path in moved)
    assert len(list((out / "label_errors").glob("*.jpg"))) == len(flagged)
    assert all(p.exists() for p in (data / "blue" / m.name for m in moved))  # flagged only, never moved
