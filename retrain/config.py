"""Every default in one place.

``TrainConfig`` is frozen: the command line builds one from its options (option name = field
name), the Python API from keyword arguments, and the whole effective config is saved beside
the model in ``run.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .features.audit import check_allowed_ops
from .features.lite import BACKENDS as EXTRACT_BACKENDS

OPTIMIZERS = ("adam", "sgd")
CLASS_WEIGHTS = ("none", "balanced")
HEADS = ("auto", "logistic", "minibatch")
EXTRACT_BATCH = 128  # images per module call at 224x224 (batch_for_images)
AUGMENT_COPIES = 5  # augmented bottlenecks cached per training image when --augment is given without --augment-copies
MAX_AUGMENT_COPIES = 100


def default_cache_dir() -> Path:
    """The user's cache folder: ``$RETRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/retrain``, else ``~/.cache/retrain``."""
    if os.environ.get("RETRAIN_CACHE_DIR"):
        return Path(os.environ["RETRAIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrain"


@dataclass(frozen=True)
class TrainConfig:
    # data split
    validation_percent: float = 10.0
    test_percent: float = 10.0
    validation_dir: str | None = None
    test_dir: str | None = None
    # module
    image_size: int | None = None  # override; otherwise read from the module's signature
    allow_unversioned: bool = False
    trust_hosts: tuple[str, ...] = ()  # hosts trusted beside tfhub.dev and Kaggle Models
    allowed_module_ops: tuple[str, ...] = ()  # ops the module audit refuses that the user accepts by name
    # bottlenecks
    cache_dir: str | None = None
    extract_batch_size: int | None = None  # None: see batch_for_images
    # devices: None runs on every GPU when two or more are visible (tf.distribute.MirroredStrategy,
    # extraction and fine-tuning, batches per replica), else on one device; 1: one device always
    devices: int | None = None
    extract_backend: str = "auto"  # what computes bottlenecks: auto, tensorflow, litert (features/lite.py)
    max_unusable_fraction: float = 0.5  # a class with more undecodable files than this is an error
    # head: "auto" picks the cross-validated logistic regression up to head.FULL_BATCH_MAX_VECTORS
    # vectors and the minibatch solver above; epochs ... label_smoothing apply to the minibatch one
    head: str = "auto"
    cv_folds: int = 5  # folds that choose the logistic head's C (3 above logistic.FEW_FOLDS_ABOVE images)
    keep_validation: bool = False  # logistic head without fine-tuning: fold validation images into training unless set
    min_accuracy: float | None = None  # fail (exit 1) when the test accuracy is below this
    epochs: int = 100
    patience: int = 10  # early stopping on validation loss; best weights kept
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.9  # sgd only
    dropout: float = 0.2
    l2: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0
    # imbalanced classes: "balanced" weighs each class by n_images / (n_classes * its count)
    class_weight: str = "none"
    # augmentation (training only, never in the exported model): on the frozen path as
    # `augment_copies` augmented bottlenecks per training image, cached; when fine-tuning, also on the fly
    augment: bool = False
    augment_copies: int | None = None  # None: AUGMENT_COPIES with augment
    # fine-tuning: stage 2 trains the module's own weights (batch norm statistics frozen) from the head;
    # epochs and patience measured on flowers_128 (README): the best epoch was 7, single epochs stall
    fine_tune: bool = False
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float | None = None  # None: learning_rate / 10
    fine_tune_batch_size: int = 32
    fine_tune_patience: int = 3  # epochs without validation improvement before stopping
    # export
    quantize: tuple[str, ...] = ("int8",)  # TFLite variants beside float32, see export.TFLITE_FORMATS
    max_accuracy_drop: float = 1.0  # points a quantized variant may lose against float32 before a warning
    calibration_samples: int = 200  # training images used to calibrate int8

    def __post_init__(self):
        for name in ("validation_percent", "test_percent"):
            value = getattr(self, name)
            if not 0 <= value < 100:
                raise ConfigError(f"--{_opt(name)} must be in [0, 100), got {value}")
        if self.validation_percent + self.test_percent >= 100:
            raise ConfigError("--validation-percent plus --test-percent must leave images for training")
        for name in ("epochs", "batch_size", "extract_batch_size", "calibration_samples", "fine_tune_epochs",
                     "fine_tune_batch_size", "devices"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{_opt(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "fine_tune_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_opt(name)} must be 0 or more, got {getattr(self, name)}")
        if self.image_size is not None and not 8 <= self.image_size <= 4096:
            raise ConfigError(f"--image-size must be between 8 and 4096, got {self.image_size}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.l2 < 0:
            raise ConfigError(f"--l2 must be 0 or more, got {self.l2}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}" + _did_you_mean(self.head, HEADS))
        if not 2 <= self.cv_folds <= 20:
            raise ConfigError(f"--cv-folds must be between 2 and 20, got {self.cv_folds}")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"--min-accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
                              + _did_you_mean(self.optimizer, OPTIMIZERS))
        if self.extract_backend not in EXTRACT_BACKENDS:
            raise ConfigError(f"--extract-backend must be one of {', '.join(EXTRACT_BACKENDS)}, got "
                              f"{self.extract_backend!r}" + _did_you_mean(self.extract_backend, EXTRACT_BACKENDS))
        if self.class_weight not in CLASS_WEIGHTS:
            raise ConfigError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}"
                              + _did_you_mean(self.class_weight, CLASS_WEIGHTS))
        self._check_augment_and_fine_tune()
        object.__setattr__(self, "quantize", tuple(self.quantize))
        object.__setattr__(self, "trust_hosts", tuple(h.lower() for h in self.trust_hosts))
        object.__setattr__(self, "allowed_module_ops", check_allowed_ops(self.allowed_module_ops))
        if not 0 <= self.max_unusable_fraction <= 1:
            raise ConfigError(f"--max-unusable-fraction must be in [0, 1], got {self.max_unusable_fraction}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"--max-accuracy-drop must be 0 or more, got {self.max_accuracy_drop}")

    def _check_augment_and_fine_tune(self) -> None:
        if self.augment_copies is not None:
            if not self.augment:
                raise ConfigError("--augment-copies needs --augment (it sets how many augmented bottlenecks are cached per image)")
            if not 0 <= self.augment_copies <= MAX_AUGMENT_COPIES:
                raise ConfigError(f"--augment-copies must be between 0 and {MAX_AUGMENT_COPIES}, got {self.augment_copies}")
            if self.augment_copies == 0 and not self.fine_tune:
                raise ConfigError("--augment-copies 0 without --fine-tune augments nothing: "
                                  "give a number of copies, add --fine-tune, or drop --augment")
        if self.fine_tune_learning_rate is not None:
            if not self.fine_tune:
                raise ConfigError("--fine-tune-learning-rate needs --fine-tune")
            if self.fine_tune_learning_rate <= 0:
                raise ConfigError(f"--fine-tune-learning-rate must be positive, got {self.fine_tune_learning_rate}")

    @property
    def resolved_augment_copies(self) -> int:
        """Augmented bottlenecks per training image for the head (0 without --augment)."""
        if not self.augment:
            return 0
        return AUGMENT_COPIES if self.augment_copies is None else self.augment_copies

    def batch_for_images(self, height: int, width: int) -> int:
        """Images per module call: ``--extract-batch-size``, or 128 at 224x224 and fewer for larger
        inputs (the same number of pixels per call, at least 8). At 224x224 on 2 CPU cores, 128
        extracted 2,000 images in 7.0 s against 7.4 s for 64 and 7.75 s for 32; larger images
        scale the memory of every call."""
        if self.extract_batch_size is not None:
            return self.extract_batch_size
        return max(8, min(EXTRACT_BATCH, round(EXTRACT_BATCH * 224 * 224 / (height * width))))

    @property
    def resolved_fine_tune_learning_rate(self) -> float:
        """The module is trained about 10x slower than the head, so its weights are adjusted, not ruined."""
        return self.fine_tune_learning_rate if self.fine_tune_learning_rate is not None else self.learning_rate / 10

    @classmethod
    def from_options(cls, **options) -> "TrainConfig":
        """Build from keyword options, rejecting unknown names with a suggestion."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in names:
                raise ConfigError(f"unknown option {key!r}" + _did_you_mean(key, sorted(names)))
        return cls(**options)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["quantize"] = list(self.quantize)
        data["trust_hosts"] = list(self.trust_hosts)
        data["allowed_module_ops"] = list(self.allowed_module_ops)
        return data

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def _opt(name: str) -> str:
    return name.replace("_", "-")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["TrainConfig", "default_cache_dir", "OPTIMIZERS", "CLASS_WEIGHTS", "HEADS", "AUGMENT_COPIES", "EXTRACT_BACKENDS"]
