"""The head's full-batch solver: multinomial logistic regression (scikit-learn's
``LogisticRegression``, L-BFGS to convergence on every vector at once), its L2 strength ``C``
chosen from ``C_GRID`` by stratified k-fold cross-validation on the training vectors, then refit
on all of them: the linear-probe protocol for frozen features (``fit_logistic_cv``).

For each fold the C path runs from the strongest regularization up, each fit warm-started from the
fold's last; the folds run side by side, C by C (``_fold_paths``), and the path stops once two Cs in
a row are clearly worse than the best before them (``_path_has_turned``). With fewer vectors than
dimensions the problem is solved, exactly, in the span of the vectors (``_span``).
``training/head.py`` chooses between this solver and the minibatch one.
"""

from __future__ import annotations

import importlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import progress
from ..config import TrainConfig
from ..distribute import cpu_cores
from .head import Head, class_counts

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # inverse L2 strength; the best moves 100x with data size
FEW_FOLDS_ABOVE = 5_000  # training images above which 3 folds replace --cv-folds (cost; C matters less there)
FALLBACK_C = 0.1  # when a class has a single image, nothing can be cross-validated
MAX_ITERATIONS = 1_000
TOLERANCE = 1e-4  # scikit-learn's default, as the reference protocol; 1e-6 measured 3x slower, no more accurate
PATH_PATIENCE = 2  # Cs in a row clearly worse than the best before them that end the C path (_path_has_turned)
PATH_Z = 2.0  # "clearly": McNemar's z of the accuracy lost against that best, on the images they classify differently


def import_solver_ahead(requested: str) -> threading.Thread | None:
    """Start importing scikit-learn's solver (1.2-1.5 s, most of it SciPy's stats) on a thread of
    its own, for a run whose head may be the logistic one: the main thread is then computing
    bottlenecks, in kernels that let go of the GIL. The later imports wait for it and raise any
    error it met themselves."""
    if requested == "minibatch":
        return None

    def load():
        try:
            for name in ("sklearn.linear_model", "sklearn.model_selection"):
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the head's own import raises it where it is needed
            pass

    thread = threading.Thread(target=load, name="import-solver", daemon=True)
    thread.start()
    return thread


def _logistic(c: float, seed: int, class_weights, warm: bool = False):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=MAX_ITERATIONS, tol=TOLERANCE, class_weight=class_weights,
                              random_state=seed, warm_start=warm)


def _full_probabilities(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a fold's training part always has all of them)."""
    probabilities = np.zeros((len(x), n_classes))
    probabilities[:, model.classes_] = model.predict_proba(x)
    return probabilities


def _folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def fit_logistic_cv(train_x, train_y, n_classes: int, config: TrainConfig,
                    class_weights: dict[int, float] | None = None, groups: np.ndarray | None = None) -> Head:
    """Multinomial logistic regression, C chosen by stratified k-fold cross-validation, refit on all.

    For each fold the C path is solved from the strongest regularization up, each fit starting
    from the previous one. The chosen C has the best cross-validated accuracy; ties (common with
    few images) go to the lower cross-validated log loss."""
    from threadpoolctl import threadpool_limits

    # The limit reaches only the libraries loaded when it is set: scikit-learn's OpenMP runtime and
    # SciPy's BLAS first (without it, fits on a first import ran 2-3x slower, on unlimited threads).
    importlib.import_module("sklearn.linear_model")

    # One BLAS / OpenMP thread: these problems are small, and with more threads the solver's
    # many small products spend their time handing work between threads (measured: 3-4x slower
    # on 2 cores). The cores are used by fitting the folds side by side instead (_fit_logistic_cv).
    with threadpool_limits(limits=1):
        return _fit_logistic_cv(train_x, train_y, n_classes, config, class_weights, groups)


def _fit_logistic_cv(train_x, train_y, n_classes, config, class_weights, groups) -> Head:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    started = time.perf_counter()
    x = np.asarray(train_x)
    basis = _span(np.asarray(x, np.float64)) if len(x) < x.shape[1] else None
    # In the span the problem is small and solved in float64; with more vectors than dimensions
    # the solver's products stream all of them at every step, and float32 (as the vectors are
    # stored) halves what they read (measured, 3,105 flower vectors: 7.5 -> 5.1 ms per step).
    z = np.asarray(x, np.float32) if basis is None else np.asarray(x, np.float64) @ basis
    y = np.asarray(train_y, np.int64)
    first = np.ones(len(y), bool) if groups is None else _first_of_group(groups)
    counts = class_counts(y[first], n_classes)
    k = min(config.cv_folds if first.sum() <= FEW_FOLDS_ABOVE else min(3, config.cv_folds), int(counts.min()))
    out_of_fold = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if k >= 2:
            probabilities = np.zeros((len(C_GRID), len(y), n_classes))
            folds = _folds(y, groups, k, config.seed)
            with progress.bar(total=len(folds) * len(C_GRID) + 1, desc="head", unit="fit") as bar:
                evaluated = _fold_paths(
                    z, y, folds, probabilities, config.seed, class_weights, bar,
                    lambda index: _path_has_turned(*_scores(probabilities[:index + 1], y, first)))
                grid = C_GRID[:evaluated]
                correct, log_loss = _scores(probabilities[:evaluated], y, first)
                accuracy = correct.mean(axis=1)
                # The first best, i.e. the smallest C among ties, as LogisticRegressionCV picks: with few
                # images many Cs tie, and the strongest regularization among them measured best.
                best = int(np.argmax(np.round(accuracy, 12)))
                chosen = grid[best]
                out_of_fold = probabilities[best, first].astype(np.float32)
                # Refit from zero: from the folds' mean solution (as LogisticRegressionCV refits) took
                # 141 steps instead of 424 on 3,882 flower vectors (3 s), but moved the small sets'
                # heads within the tolerance (bench few-shot: flowers 30 per class 0.596 -> 0.593).
                final = _logistic(chosen, config.seed, class_weights).fit(z, y)
                bar.total = bar.n + 1
                bar.update(1)
            cross_validation = {
                "folds": k, "c": chosen, "grid": list(grid), "path_stopped": evaluated < len(C_GRID),
                "accuracy_per_c": [round(float(a), 6) for a in accuracy],
                "log_loss_per_c": [round(float(v), 6) for v in log_loss],
                "accuracy": float(accuracy[best]), "n_images": int(first.sum()),
            }
        else:
            chosen = FALLBACK_C
            final = _logistic(chosen, config.seed, class_weights).fit(z, y)
            cross_validation = {"folds": 0, "c": chosen, "grid": [chosen],
                                "note": "a class has a single training image: C was not cross-validated"}
    cross_validation["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    kernel, bias = _softmax_layer(final, basis, x.shape[1], n_classes)
    return Head(kernel=kernel, bias=bias, epochs_run=None, best_epoch=None, history={},
                seconds=time.perf_counter() - started, solver="logistic",
                cross_validation=cross_validation, out_of_fold=out_of_fold)


def _scores(probabilities: np.ndarray, y: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per C, from out-of-fold ``probabilities`` [C, n, classes]: which images are classified right
    ([C, images]) and the log loss ([C]), counting each image's first vector only."""
    scored = probabilities[:, first]
    truth = y[first]
    correct = scored.argmax(axis=2) == truth
    log_loss = -np.log(np.clip(scored[:, np.arange(len(truth)), truth], 1e-12, 1.0)).mean(axis=1)
    return correct, log_loss


def _path_has_turned(correct: np.ndarray, log_loss: np.ndarray, patience: int = PATH_PATIENCE,
                     z_min: float = PATH_Z) -> bool:
    """Whether each of the last ``patience`` Cs is clearly worse than the best C before it: less
    accurate by more than chance (McNemar's z, on the images one of the two gets right, above
    ``z_min``) and with a higher log loss than every C before it. The path has then passed its
    best and the weaker regularization still ahead (the slowest fits) does not win.

    Measured on 49 accuracy curves of the cached vectors of both data sets (5 to 900 images per
    class, 5 random subsets each): stopping so never chose another C than the whole grid; flat
    curves (cats vs dogs) run the whole grid, flowers' from 300 per class stop after 4-6 of 8 Cs."""
    accuracy = np.round(correct.mean(axis=1), 12)
    if len(accuracy) <= patience:
        return False
    for j in range(len(accuracy) - patience, len(accuracy)):
        best = int(np.argmax(accuracy[:j]))
        lost = np.count_nonzero(correct[best] & ~correct[j])
        won = np.count_nonzero(~correct[best] & correct[j])
        if lost <= won or (lost - won) / np.sqrt(lost + won) <= z_min or log_loss[j] <= log_loss[:j].min():
            return False
    return True


def _fold_paths(z, y, folds, probabilities, seed: int, class_weights, bar, turned) -> int:
    """Each fold's C path into ``probabilities`` [C, n, classes], each fit warm-started from the fold's last.

    Returns the number of Cs evaluated. ``turned(index)``, called once every fold has C number
    ``index``, ends the path after it when true.

    Fits run on one thread per core, taken in order of C then fold, so that a C is complete
    as early as it can be; a fold's next C may start before the others finish this one, and
    is discarded if the path ends there. The folds are independent (each writes its own held-out
    rows) and the solver lets go of the GIL in its products: the same figures bit for bit as one
    fit after the other (measured, cats/dogs 1,785 vectors: 1.40-1.63 s -> 1.05-1.13 s)."""
    n_folds, n_c = len(folds), len(C_GRID)
    models = [_logistic(C_GRID[0], seed, class_weights, warm=True) for _ in folds]
    next_index, busy, complete = [0] * n_folds, [False] * n_folds, [0] * n_c
    state = {"limit": n_c}
    changed = threading.Condition()

    def take():
        with changed:
            while True:
                ready = [(next_index[f], f) for f in range(n_folds) if not busy[f] and next_index[f] < state["limit"]]
                if ready:
                    index, fold = min(ready)
                    busy[fold], next_index[fold] = True, index + 1
                    return fold, index
                if not any(busy):
                    return None
                changed.wait()

    def work():
        while (task := take()) is not None:
            fold, index = task
            try:
                fit_part, held_out = folds[fold]
                model = models[fold]
                model.set_params(C=C_GRID[index])
                model.fit(z[fit_part], y[fit_part])
                probabilities[index, held_out] = _full_probabilities(model, z[held_out], probabilities.shape[2])
            except BaseException:
                with changed:  # the other workers stop at their next take
                    state["limit"], busy[fold] = 0, False
                    changed.notify_all()
                raise
            with changed:
                busy[fold] = False
                complete[index] += 1
                bar.update(1)
                # C numbers complete in order (each fold runs them in order), so each is decided once, in turn.
                if complete[index] == n_folds and index + 1 < state["limit"] and turned(index):
                    state["limit"] = index + 1
                changed.notify_all()

    with ThreadPoolExecutor(max_workers=min(n_folds, cpu_cores()), thread_name_prefix="head-fold") as pool:
        for running in [pool.submit(work) for _ in range(min(n_folds, cpu_cores()))]:
            running.result()
    return state["limit"]


def _first_of_group(groups: np.ndarray) -> np.ndarray:
    groups = np.asarray(groups)
    _, index = np.unique(groups, return_index=True)
    first = np.zeros(len(groups), bool)
    first[index] = True
    return first


def _span(x: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis [dim, rank] of the training vectors' span, when they are fewer than
    their dimension (else None: nothing to gain).

    Exact, not an approximation: with an L2 penalty the weights of every fit on these vectors (or
    on a fold of them) lie in their span (the representer theorem), so solving in the rotated
    coordinates ``x @ basis`` and mapping back gives the same weights, the same penalty and the
    same logits for any vector, and the solver works on ``rank`` instead of ``dim`` features."""
    n, dim = x.shape
    if n >= dim:
        return None
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-9 if len(s) and s[0] > 0 else np.zeros(len(s), bool)
    return vt[keep].T if keep.any() else None


def _softmax_layer(model, basis, dim: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted model as the serving graph's softmax layer (kernel [dim, classes], bias [classes]),
    mapped back from the span's coordinates when the fit was solved there.

    Two classes: scikit-learn fits one logit z (for class 1); softmax of (-z/2, z/2) is
    (1 - sigmoid(z), sigmoid(z)), the same probabilities, with both columns of one scale
    (which int8 per-channel quantization prefers to a zero column)."""
    coef = np.asarray(model.coef_, np.float64)
    if basis is not None:
        coef = coef @ basis.T
    intercept = np.asarray(model.intercept_, np.float64)
    if n_classes == 2:
        kernel = np.stack([-coef[0] / 2, coef[0] / 2], axis=1)
        bias = np.array([-intercept[0] / 2, intercept[0] / 2])
    else:
        kernel, bias = coef.T, intercept
    assert kernel.shape == (dim, n_classes)
    return kernel.astype(np.float32), bias.astype(np.float32)
