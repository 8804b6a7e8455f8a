"""Bottleneck extraction through LiteRT's XNNPACK kernels, where they beat TensorFlow's.

On a CPU, LiteRT's XNNPACK runs a module's forward pass faster than TensorFlow (MobileNetV2 0.35
at 224x224 on 2 cores: see ``INVOKE_BATCH`` and the README's figures). The module's uint8 ->
features function (``LoadedModule.pixel_features``: the same cast and scaling, the same module)
is converted once to a float32 TFLite flatbuffer and kept in the cache folder as
``litert/<fingerprint[:16]>-<preprocessing key>.tflite`` (safety.py knows the name; ``cache
clear`` removes it).

The vectors go into the same cache entry as TensorFlow's, so before LiteRT computes any of them
a probe batch of the very images to compute (decoded as extraction decodes them) goes through
both: LiteRT's vectors must be within ``TOLERANCE`` of TensorFlow's. When they are not, LiteRT
is not used for the run (a warning says so, or, when LiteRT was asked for by name, the run
stops with one error line) and TensorFlow computes everything: the entry never holds vectors
further apart than the tolerance. Which backend made the run's vectors, and why, is recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..distribute import cpu_cores
from ..errors import ModuleError, first_line

BACKENDS = ("auto", "tensorflow", "litert")
# max |LiteRT - TensorFlow| over the probe's vectors, relative to the largest |TensorFlow value| there.
# Measured on the real MobileNetV2 0.35 and 64 cats/dogs photos: 4.7e-6 (max abs 2.6e-5 for values up
# to 5.7; cosine >= 0.9999998), where TensorFlow agrees with itself exactly across batch sizes. A head
# cannot tell such vectors apart; 1e-4 leaves a 20x margin for other modules and CPUs.
TOLERANCE = 1e-4
PROBE_IMAGES = 16  # spread over the images to compute: both classes of a sorted folder, say
# Images per invoke. 2 cores, MobileNetV2 0.35: forward alone on 256 decoded images, best of 3, 498
# images/s at 1, 542 at 4, 471 at 8, 446 at 16, 403 at 32, 364 at 64 (large batches leave the caches);
# whole extractions of 2,000 photos, median CPU seconds of 3: 6.67 at 1, 6.33 at 2, 6.38 at 4, 6.54 at
# 8, 7.25 at 16. Threads: one per core (2 threads: 5.2 s wall against 7.6 s for 1, same CPU seconds).
INVOKE_BATCH = 4
# Without a converted file cached, "auto" converts only for at least this many images to compute.
# Conversion is paid once per module: 0.8-1.7 s for MobileNetV2 0.35 on a busy 2-core machine. Cold
# cache, conversion included, medians of 3 alternated rounds (CPU seconds, wall seconds): 250 images
# TensorFlow 1.50 / 2.23 against LiteRT 1.82 / 2.55; 500: 2.99 / 4.17 against 2.71 / 3.46; 1,000:
# 6.00 / 7.29 against 4.18 / 5.27. The break-even is near 400 images. (Measured before conversion
# froze the module without rebuilding a function, retrain/_converter.py: 0.6-0.8 s alone since,
# so the break-even is lower now; not measured again.) A run that exports the module's conversion
# as its TFLite file (`train` without --fine-tune) converts it anyway, and there LiteRT paid from
# the smallest folders: cold default train, wall seconds of 3 alternated rounds, TensorFlow against
# LiteRT, 40 images 6.98-7.41 / 6.95-7.55, 200 images 8.04-8.36 / 7.36-7.76, 500 images 8.75-9.19 /
# 7.89-8.17 (`converted_anyway`).
AUTO_MIN_IMAGES = 500


def converted_path(cache_root: str | os.PathLike, info) -> Path:
    """Where the converted module of ``info`` (a ModuleInfo) lives in the cache folder."""
    from ..safety import CONVERTED_DIR

    return Path(cache_root).expanduser() / CONVERTED_DIR / f"{info.fingerprint[:16]}-{info.input_spec.key()}.tflite"


def convert_module(module) -> bytes:
    """The module's ``pixel_features`` (uint8 [n, H, W, 3] -> float32 [n, dim]) as a float32 TFLite flatbuffer."""
    from .._converter import from_concrete_function
    from .._tf import quiet_stderr

    # Frozen and converted directly, as the serving model's files are (serving/tflite.py).
    converter = from_concrete_function(module.pixel_features.get_concrete_function(), module.obj)
    with quiet_stderr():  # the converter logs its passes from C++
        return converter.convert()


def write_converted(module, cache_root: str | os.PathLike) -> tuple[Path, float]:
    """Convert ``module`` and write the file atomically into the cache; returns the path and the seconds it took."""
    from ..files import write_atomic
    from ..safety import ensure_cache

    path = converted_path(cache_root, module.info)
    started = time.perf_counter()
    flatbuffer = convert_module(module)
    seconds = time.perf_counter() - started
    ensure_cache(cache_root)  # a retrain cache, tagged, before anything is written there
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, flatbuffer)
    return path, seconds


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ModuleError("--extract-backend litert needs the LiteRT interpreter: pip install ai-edge-litert") from None
    return Interpreter


class LiteForward:
    """A converted module under LiteRT (XNNPACK): uint8 [n, H, W, 3] NumPy batches -> float32 [n, dim]."""

    takes_tensors = False  # extraction hands it NumPy batches (no copy out of a tf.Tensor)

    def __init__(self, path: str | os.PathLike, height: int, width: int, dim: int,
                 num_threads: int | None = None, invoke_batch: int = INVOKE_BATCH):
        from .._tf import quiet_stderr

        Interpreter = _interpreter_class()
        self.num_threads = num_threads or cpu_cores()
        with quiet_stderr():  # LiteRT logs the XNNPACK delegate's creation on stderr
            self.interpreter = Interpreter(model_path=str(path), num_threads=self.num_threads)
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            shape = [int(n) for n in self._input["shape"]]
            if shape[1:] != [height, width, 3] or self._input["dtype"] != np.uint8:
                raise ValueError(f"the converted module takes {self._input['dtype'].__name__} {shape}, "
                                 f"not uint8 [n, {height}, {width}, 3]")
            flexible = int(self._input.get("shape_signature", shape)[0]) == -1
            self.invoke_batch = invoke_batch if flexible else shape[0]
            self.interpreter.resize_tensor_input(self._input["index"], [self.invoke_batch, height, width, 3])
            self.interpreter.allocate_tensors()
        out_shape = [int(n) for n in self.interpreter.get_output_details()[0]["shape"]]
        if out_shape != [self.invoke_batch, dim]:
            raise ValueError(f"the converted module outputs {out_shape}, not [{self.invoke_batch}, {dim}]")
        self.dim = dim

    def __call__(self, pixels) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        step = self.invoke_batch
        vectors = np.empty((len(pixels), self.dim), np.float32)
        for start in range(0, len(pixels), step):
            chunk = pixels[start:start + step]
            if len(chunk) < step:  # padded rather than resized: a resize re-plans the delegate
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.uint8)])
            self.interpreter.set_tensor(self._input["index"], chunk)
            self.interpreter.invoke()
            vectors[start:start + step] = self.interpreter.get_tensor(self._output["index"])[:len(vectors) - start]
        return vectors


def probe_pixels(images, spec, count: int = PROBE_IMAGES) -> np.ndarray | None:
    """Up to ``count`` of ``images`` (dataset.ImageFile), spread over the list, decoded as extraction decodes them."""
    from ..data.images import iter_image_batches

    chosen = list(images)[::max(1, len(images) // count)][:count]
    batches = [batch for _, batch, _ in iter_image_batches([i.path for i in chosen], [i.decoder for i in chosen],
                                                           spec.height, spec.width, count) if batch is not None]
    return np.concatenate(batches) if batches else None


def compare(module, forward: LiteForward, pixels: np.ndarray, tolerance: float = TOLERANCE) -> dict:
    """LiteRT's vectors of ``pixels`` against TensorFlow's: the figures, and whether they are within ``tolerance``."""
    from .._tf import tf as _tf

    reference = module.pixel_features(_tf().constant(pixels)).numpy()
    difference = np.abs(forward(pixels) - reference)
    max_abs, scale = float(difference.max()), float(np.abs(reference).max())
    return {"images": int(len(pixels)), "max_abs_diff": max_abs, "max_abs_value": scale,
            "relative_diff": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
            "tolerance": tolerance,
            "within": bool(max_abs <= tolerance * scale)}  # False for NaN too


class ExtractionBackend:
    """What computes the bottlenecks: ``extract_bottlenecks(..., backend=this)`` calls it with the
    images to compute, once, and it returns the forward function to use on their batches.

    ``requested``: "tensorflow", "litert", or "auto": LiteRT when TensorFlow has no GPU and the
    converted module is cached, or the run converts it anyway (``converted_anyway``: `train`, for
    its TFLite file), or at least ``min_images`` images are to be computed (converting then pays).
    LiteRT is used only after the probe check (module docstring). ``record`` says which backend
    made the vectors and why; ``warnings`` what the run must tell the user.

    ``convert_ahead(count)`` starts the conversion on a thread of its own before the images are
    known to extraction (``train`` calls it while the module's probe runs, with the number of
    images the cache lacks); the call then takes that conversion, and reports its failures as
    its own."""

    def __init__(self, module, cache_root: str | os.PathLike, requested: str = "auto", *,
                 num_threads: int | None = None, invoke_batch: int = INVOKE_BATCH, min_images: int = AUTO_MIN_IMAGES,
                 converted_anyway: bool = False):
        if requested not in BACKENDS:
            raise ModuleError(f"extraction backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        self.module, self.cache_root, self.requested = module, cache_root, requested
        self.num_threads, self.invoke_batch, self.min_images = num_threads or cpu_cores(), invoke_batch, min_images
        self.converted_anyway = converted_anyway
        self.record: dict = {"backend": None, "requested": requested, "reason": "no image to compute"}
        self.warnings: list[str] = []
        self._ahead = None  # a Future of write_converted's (path, seconds)

    def convert_ahead(self, count: int) -> bool:
        """Start converting the module now, on a thread, when a call for ``count`` images would
        convert it (LiteRT chosen, no converted file cached); returns whether it started.
        Measured on the cold default run (README, "Fixed costs"): the conversion's Python and the
        probe's TensorFlow run side by side, and extraction no longer waits for the conversion."""
        if self._ahead is not None or self._why_tensorflow(count) is not None:
            return False
        if converted_path(self.cache_root, self.module.info).is_file():
            return False
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-ahead")
        self._ahead = pool.submit(write_converted, self.module, self.cache_root)
        pool.shutdown(wait=False)
        return True

    def __call__(self, todo):
        reason = self._why_tensorflow(len(todo))
        if reason is not None:
            return self._tensorflow(reason)
        path = converted_path(self.cache_root, self.module.info)
        ahead, self._ahead = self._ahead, None
        was_cached, problem, mismatch = ahead is None and path.is_file(), None, None
        # A cached file that fails to load or to agree is converted again once (a damaged or stale file).
        for fresh in ((False, True) if was_cached else (True,)):
            seconds, stage = None, "convert"
            try:
                if fresh:
                    path, seconds = ahead.result() if ahead is not None else write_converted(self.module, self.cache_root)
                stage = "load"
                forward = self._forward(path)
                pixels = probe_pixels(todo, self.module.info.input_spec)
                if pixels is None:
                    return self._tensorflow("no probe image could be decoded to check LiteRT against")
                stage = "run"
                probe = compare(self.module, forward, pixels)
            except Exception as error:  # noqa: BLE001 - any converter or interpreter failure: reported, then TensorFlow
                problem, mismatch = f"LiteRT could not {stage} the module ({first_line(error)})", None
                continue
            if probe["within"]:
                self.record = {"backend": "litert", "requested": self.requested, "reason": self._why_litert(seconds, was_cached),
                               "converted": str(path), "conversion_seconds": None if seconds is None else round(seconds, 3),
                               "probe": probe, "threads": forward.num_threads, "invoke_batch": forward.invoke_batch}
                return forward
            problem, mismatch = (f"LiteRT's vectors differ from TensorFlow's by up to {probe['max_abs_diff']:.3g} "
                                 f"({probe['relative_diff']:.3g} of the largest value) on {probe['images']} probe "
                                 f"images, beyond the tolerance {probe['tolerance']:g}"), probe
        return self._refuse(problem, mismatch)

    def _why_tensorflow(self, count: int) -> str | None:
        if self.requested == "tensorflow":
            return "asked for (--extract-backend tensorflow)"
        if self.requested == "litert":
            return None
        from .._tf import tf as _tf

        if _tf().config.list_physical_devices("GPU"):
            return "TensorFlow runs the module on a GPU"
        if self.converted_anyway or count >= self.min_images or converted_path(self.cache_root, self.module.info).is_file():
            return None
        return (f"{count} image(s) to compute, fewer than {self.min_images}: converting the module for LiteRT "
                "would not pay")

    def _why_litert(self, seconds: float | None, was_cached: bool) -> str:
        if self.requested == "litert":
            return "asked for (--extract-backend litert)"
        if seconds is None:
            return "the module converted for LiteRT was cached"
        if was_cached:
            return "the cached converted module failed to load or agree, and was converted again"
        if self.converted_anyway:
            return "the run exports the module's LiteRT conversion as its TFLite file: converted first, for extraction too"
        return f"at least {self.min_images} images to compute: the module was converted for LiteRT"

    def _forward(self, path: Path) -> LiteForward:
        spec = self.module.info.input_spec
        return LiteForward(path, spec.height, spec.width, self.module.info.feature_dim, self.num_threads,
                           self.invoke_batch)

    def _tensorflow(self, reason: str):
        self.record = {"backend": "tensorflow", "requested": self.requested, "reason": reason}
        return self.module.pixel_features

    def _refuse(self, problem: str, probe: dict | None):
        if self.requested == "litert":
            raise ModuleError(f"{problem}: use --extract-backend tensorflow (or auto) for this module")
        self.warnings.append(f"{problem}: TensorFlow computed the bottlenecks instead")
        forward = self._tensorflow(f"LiteRT not used: {problem}")
        if probe is not None:
            self.record["probe"] = probe
        return forward


__all__ = ["BACKENDS", "TOLERANCE", "ExtractionBackend", "LiteForward", "compare", "convert_module", "converted_path",
           "write_converted"]
