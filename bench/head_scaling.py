"""Part 4: head training time on cached vectors, for growing numbers of vectors.

The vectors are synthetic (class centres plus noise, clipped at zero like ReLU features) with
the module's dimension; the head is ``retrain.training.head.train_head_minibatch`` with the tool's defaults,
except a fixed number of epochs and early stopping off, so that every size does the same
number of passes and the times are comparable. Validation vectors: a tenth of the training count.
"""

from __future__ import annotations

import time

from .common import Context, Row, fmt_s

DIM = 1280
CLASSES = 5
LINEAR_SLACK = 1.5  # the largest size may cost at most 1.5x its share of the mid size's time
SECONDS_LIMIT = 60.0


def _vectors(rng, count: int, centres):
    import numpy as np

    labels = rng.integers(0, len(centres), count)
    vectors = centres[labels] + rng.normal(0.0, 1.0, (count, centres.shape[1])).astype(np.float32)
    return np.maximum(vectors, 0.0, out=vectors), labels


def run(ctx: Context) -> tuple[dict, list[Row]]:
    import numpy as np

    from retrain import progress
    from retrain.config import TrainConfig
    from retrain.training.head import train_head_minibatch

    progress.set_enabled(False)
    sizes = sorted(ctx.sizes["head_sizes"])
    epochs = ctx.sizes["head_epochs"]
    config = TrainConfig(epochs=epochs, patience=0)
    rng = np.random.default_rng(0)
    centres = rng.random((CLASSES, DIM), dtype=np.float32)
    measured = []
    for count in sizes:
        train_x, train_y = _vectors(rng, count, centres)
        val_x, val_y = _vectors(rng, max(1, count // 10), centres)
        started = time.perf_counter()
        head = train_head_minibatch(train_x, train_y, val_x, val_y, CLASSES, config)
        seconds = time.perf_counter() - started
        measured.append({"vectors": count, "seconds": round(seconds, 3), "fit_seconds": round(head.seconds, 3),
                         "epochs": head.epochs_run, "us_per_vector_epoch": round(1e6 * head.seconds / (count * head.epochs_run), 3)})
        del train_x, val_x
    rows = [Row("4 head", f"{m['vectors']:,} vectors, {m['epochs']} epochs", fmt_s(m["seconds"]),
                f"< {SECONDS_LIMIT:.0f} s" if m is measured[-1] else "",
                m["seconds"] < SECONDS_LIMIT if m is measured[-1] else None) for m in measured]
    details = {"dim": DIM, "classes": CLASSES, "epochs": epochs, "config": "TrainConfig defaults, patience 0",
               "sizes": measured}
    if len(measured) >= 2:
        mid, big = measured[-2], measured[-1]
        growth = big["seconds"] / mid["seconds"]
        allowed = LINEAR_SLACK * big["vectors"] / mid["vectors"]
        details["growth"] = growth
        rows.append(Row("4 head", f"time {big['vectors']:,} / {mid['vectors']:,} vectors (linear: "
                                  f"{big['vectors'] / mid['vectors']:.0f}x)", f"{growth:.1f}x", f"<= {allowed:.0f}x",
                        growth <= allowed))
    return details, rows
