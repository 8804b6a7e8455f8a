"""retrain: turn a folder of labelled images into an image classifier that runs on a phone."""

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "predict", "export", "export_module", "ModuleExport", "TrainConfig", "TrainResult",
           "RetrainError", "__version__"]

# The API's names are imported on first use, not with the package: the command line imports the
# package (for __version__) and ``retrain predict model.tflite`` then imports only what it runs.
_LAZY = {"train": "api", "evaluate": "api", "predict": "api", "export": "api", "TrainResult": "api",
         "export_module": "api", "ModuleExport": "api",
         "TrainConfig": "config", "RetrainError": "errors"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # ``import retrain`` then ``retrain.api...``, as when the API was imported eagerly
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
