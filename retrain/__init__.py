"""retrain: turn a folder of labelled images into an image classifier that runs on a phone."""

__version__ = "0.1.0"

from .api import TrainResult, evaluate, export, predict, train  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import RetrainError  # noqa: E402

__all__ = ["train", "evaluate", "predict", "export", "TrainConfig", "TrainResult", "RetrainError", "__version__"]
