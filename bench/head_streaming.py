"""Part 9: the minibatch head on more vectors than fit its memory budget, streamed from disk.

For each size (100k and 1M by default) a fresh process writes synthetic vectors (the module's
1,280 dimensions, 10 classes: class centres plus noise, clipped at zero like ReLU features, as
part 4) into a vector store on disk in the scratch folder, a chunk at a time (1M vectors are
5.1 GB; the free space is checked first), plus a tenth as many validation vectors. It then
trains the head on them as ``train`` does above ``IN_MEMORY_MAX_BYTES``: ``StoredVectors`` read in
shuffled buffers (``train_head_minibatch``), validation streamed too, the tool's defaults except
a fixed number of epochs and early stopping off. Measured: the process's peak resident memory
while the head trains (the window starts after the vectors are written and TensorFlow is
loaded), and the time. For reference the smallest size is also trained from an array in memory
(the path below the budget). The store is an unnamed file: it is gone when the process ends.

    python -m bench.head_streaming --worker COUNT --dir DIR --epochs N [--in-memory]   (the measured process)
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from pathlib import Path

from .common import BenchError, Context, Row, fmt_s, run_json

DIM = 1280
CLASSES = 10
CHUNK = 8192  # vectors generated and written at a time
MEMORY_RATIO = 1.2  # peak memory of the largest size may be at most 1.2x that of the smallest
LINEAR_SLACK = 1.5  # its time at most 1.5x its share of the smallest size's time
SPARE_BYTES = 2 << 30  # disk left free beyond the vectors


def _vectors(rng, count: int, centres):
    import numpy as np

    labels = rng.integers(0, len(centres), count)
    vectors = centres[labels] + rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    return np.maximum(vectors, 0.0, out=vectors), labels


def _stored(folder: str, count: int, rng, centres):
    """``count`` vectors written to a new store a chunk at a time: (StoredVectors, labels)."""
    import numpy as np

    from retrain.features.vectors import StoredVectors, VectorStore

    store, labels = VectorStore(folder), []
    for start in range(0, count, CHUNK):
        vectors, chunk_labels = _vectors(rng, min(CHUNK, count - start), centres)
        store.add(range(start, start + len(vectors)), vectors)  # keys: any hashable; a store's rows follow them
        labels.append(chunk_labels)
    return StoredVectors([(store, np.arange(count))]), np.concatenate(labels)


def worker(count: int, folder: str, epochs: int, in_memory: bool) -> dict:
    import numpy as np

    from retrain import progress
    from retrain._tf import tf as load_tf
    from retrain.config import TrainConfig
    from retrain.training import head as head_module

    from .common import peak_rss_mb, proc_status_kb, reset_peak_rss

    progress.set_enabled(False)
    load_tf()  # TensorFlow's (and Keras's) own memory is in the baseline, not in the head's window
    importlib.import_module("keras")

    rng = np.random.default_rng(0)
    centres = 0.15 * np.random.default_rng(1).random((CLASSES, DIM), dtype=np.float32)  # close: accuracy is not 1
    started = time.perf_counter()
    if in_memory:
        train_x, train_y = _vectors(rng, count, centres)
        val_x, val_y = _vectors(rng, max(1, count // 10), centres)
    else:
        train_x, train_y = _stored(folder, count, rng, centres)
        val_x, val_y = _stored(folder, max(1, count // 10), rng, centres)
    written = time.perf_counter() - started
    before = (proc_status_kb("VmRSS") or 0) / 1024
    window = reset_peak_rss()
    started = time.perf_counter()
    head = head_module.train_head_minibatch(train_x, train_y, val_x, val_y, CLASSES, TrainConfig(epochs=epochs, patience=0))
    seconds = time.perf_counter() - started
    return {"vectors": count, "validation_vectors": len(val_y), "path": "in memory" if in_memory else "streamed",
            "epochs": head.epochs_run, "seconds": round(seconds, 2), "fit_seconds": round(head.seconds, 2),
            "us_per_vector_epoch": round(1e6 * head.seconds / (count * head.epochs_run), 3),
            "write_seconds": round(written, 1), "vector_bytes": count * DIM * 4,
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "peak_window_reset": window,
            "val_accuracy": round(head.history["val_accuracy"][-1], 4),
            "buffer_bytes": head_module.STREAM_BUFFER_BYTES}


def run(ctx: Context) -> tuple[dict, list[Row]]:
    sizes = sorted(ctx.sizes["stream_sizes"])
    epochs = ctx.sizes["stream_epochs"]
    folder = ctx.work / "head-streaming"
    folder.mkdir(parents=True, exist_ok=True)
    measured = []
    for count in sizes:
        needed = int(1.1 * count * DIM * 4) + SPARE_BYTES  # training and validation vectors
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise BenchError(f"{count:,} vectors need {needed / 1e9:.1f} GB free in {folder}, {free / 1e9:.1f} GB are")
        report, wall, _ = run_json(["-m", "bench.head_streaming", "--worker", str(count), "--dir", str(folder),
                                    "--epochs", str(epochs)], f"streamed head on {count:,} vectors")
        report["wall"] = round(wall, 1)
        measured.append(report)
    reference, _, _ = run_json(["-m", "bench.head_streaming", "--worker", str(sizes[0]), "--dir", str(folder),
                                "--epochs", str(epochs), "--in-memory"], f"in-memory head on {sizes[0]:,} vectors")
    shutil.rmtree(folder, ignore_errors=True)
    rows = [Row("9 head-streaming",
                f"{m['vectors']:,} vectors ({m['vector_bytes'] / 1e9:.2f} GB), {m['path']}, {m['epochs']} epochs: "
                "peak RSS / time", f"{m['peak_rss_mb']:,.0f} MB / {fmt_s(m['seconds'])}")
            for m in measured + [reference]]
    details = {"dim": DIM, "classes": CLASSES, "epochs": epochs, "config": "TrainConfig defaults, patience 0",
               "sizes": measured, "in_memory_reference": reference}
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        growth = large["seconds"] / small["seconds"]
        scale = large["vectors"] / small["vectors"]
        details.update(memory_ratio=ratio, time_growth=growth)
        rows.append(Row("9 head-streaming", f"peak RSS {large['vectors']:,} / {small['vectors']:,} vectors",
                        f"{ratio:.2f}x", f"<= {MEMORY_RATIO}x", ratio <= MEMORY_RATIO))
        rows.append(Row("9 head-streaming",
                        f"time {large['vectors']:,} / {small['vectors']:,} vectors (linear: {scale:.0f}x)",
                        f"{growth:.1f}x", f"<= {LINEAR_SLACK * scale:.0f}x", growth <= LINEAR_SLACK * scale))
    return details, rows


def main() -> None:
    parser = argparse.ArgumentParser(description="measured process of bench part 9")
    parser.add_argument("--worker", required=True, type=int, metavar="COUNT")
    parser.add_argument("--dir", required=True, help="folder for the vector store (an unnamed file in it)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--in-memory", action="store_true", help="train from an array instead (the reference)")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(json.dumps(worker(args.worker, args.dir, args.epochs, args.in_memory)))


if __name__ == "__main__":
    main()
