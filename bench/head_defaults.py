"""Compare head settings on real data (cached bottlenecks): test accuracy and training time.

    python bench/head_defaults.py [--data ../shared/data] [--cache-dir DIR]

Prints one line per (dataset, setting); used to choose TrainConfig's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from retrain import progress
from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
from retrain.config import TrainConfig
from retrain.data.dataset import split_dataset
from retrain.training.head import train_head_minibatch
from retrain.features.module import load_module

SETTINGS = {
    "adam lr=0.001 b64": dict(optimizer="adam", learning_rate=0.001, batch_size=64),
    "adam lr=0.001 b32": dict(optimizer="adam", learning_rate=0.001, batch_size=32),
    "adam lr=0.003 b64": dict(optimizer="adam", learning_rate=0.003, batch_size=64),
    "sgd lr=0.005 m0.9 b32 (old hub tool)": dict(optimizer="sgd", learning_rate=0.005, batch_size=32),
    "sgd lr=0.01 m0.9 b64": dict(optimizer="sgd", learning_rate=0.01, batch_size=64),
    "adam no smoothing": dict(label_smoothing=0.0),
    "adam dropout 0.5": dict(dropout=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("RETRAIN_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="cats_vs_dogs,flowers")
    args = parser.parse_args()
    data = Path(args.data)
    progress.set_enabled(False)
    module = load_module(str(data / "modules" / "mobilenet_v2_035_224"))
    base = TrainConfig(cache_dir=args.cache_dir)
    cache = BottleneckCache(base.resolved_cache_dir, module.info.fingerprint, module.info.input_spec.key())
    rows = []
    folders = {"cats_vs_dogs": data / "cats_and_dogs_filtered" / "train", "flowers": data / "flowers_128"}
    for name in args.datasets.split(","):
        folder = folders[name]
        split = split_dataset(folder)
        vectors = extract_bottlenecks(split.train + split.validation + split.test, module, cache).vectors
        arrays = {}
        for part in ("train", "validation", "test"):
            images = getattr(split, part)
            arrays[part] = (np.stack([vectors[i.content_hash] for i in images]), np.asarray([i.label for i in images]))
        for label, overrides in SETTINGS.items():
            accuracies, seconds, epochs = [], [], []
            for seed in range(args.seeds):
                config = replace(base, seed=seed, **overrides)
                started = time.perf_counter()
                head = train_head_minibatch(*arrays["train"], *arrays["validation"], len(split.classes), config)
                seconds.append(time.perf_counter() - started)
                test_x, test_y = arrays["test"]
                accuracies.append(float((head.probabilities(test_x).argmax(1) == test_y).mean()))
                epochs.append(head.best_epoch)
            row = {"dataset": name, "setting": label, "test_accuracy": round(float(np.mean(accuracies)), 4),
                   "min": round(min(accuracies), 4), "seconds": round(float(np.mean(seconds)), 2), "best_epochs": epochs}
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
