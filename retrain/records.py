"""What a run leaves beside the model: ``TrainResult`` (the Python and JSON answer), the stage
timings, and the records (``run.json``, ``metrics.json``, the model card)."""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import TrainConfig
from .evaluation.card import model_card
from .safety import MODEL, manifest

RUN_FILE = "run.json"
MODEL_CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
SAVED_MODEL_DIR = "saved_model"


@dataclass
class TrainResult:
    output: str
    classes: list[str]
    split: dict  # images per split
    split_per_class: dict
    metrics: dict  # cross_validation or validation / test / tflite per format, each accuracy with its interval
    timings: dict  # seconds per stage
    cache: dict  # hits, misses, corrupt_shards, dir
    module: dict  # handle, fingerprint, input spec, feature dim
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)  # solver, seconds; minibatch: epochs; logistic: cross_validation
    label_errors: list[dict] = field(default_factory=list)  # likely mislabelled training images (flagged only)
    class_balance: dict = field(default_factory=dict)  # train images per class, imbalance ratio, class weights
    augment: dict = field(default_factory=dict)  # settings and augmented copies (empty without --augment)
    fine_tune: dict = field(default_factory=dict)  # stage 2 (empty without --fine-tune)
    devices: dict = field(default_factory=dict)  # replicas (1: no strategy), strategy, devices, batches as run

    def to_dict(self) -> dict:
        return asdict(self)


class Stopwatch:
    """Seconds per stage: ``with watch("head"): ...``; ``total`` from construction."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - mark  # a stage may come back

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in {**self.seconds, "total": time.perf_counter() - self.started}.items()}


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"retrain": __version__, "python": platform.python_version()}
    for name in ("tensorflow", "keras", "tensorflow-hub", "numpy", "pillow", "ai-edge-litert", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_records(image_dir, result: TrainResult, config: TrainConfig, folder: Path) -> None:
    """metrics.json and the model card, then run.json last: the marker that makes the folder
    replaceable by a later run, listing every file in it."""
    run = {
        "tool": "retrain",
        "output_kind": "model",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_dir": str(Path(image_dir).expanduser().resolve()),
        "config": config.to_dict(),
        **{key: getattr(result, key) for key in ("module", "classes", "split", "split_per_class", "head",
                                                  "label_errors", "class_balance", "augment", "fine_tune",
                                                  "devices")},
        "metrics_file": METRICS_FILE,
        "cache": {"hits": result.cache["hits"], "misses": result.cache["misses"],
                  "backend": result.cache.get("backend")},  # what computed this run's vectors (features/lite.py)
        "skipped": result.skipped,
        "versions": _package_versions(),
    }
    (folder / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2) + "\n")
    (folder / MODEL_CARD_FILE).write_text(model_card(run, result.metrics))
    run["files"] = manifest(folder, MODEL)
    (folder / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
