"""A module's slim copy: its inference function and variables alone, cached per fingerprint.

A published module's SavedModel holds every function it was saved with: MobileNetV2 0.35 has
627 (each Keras layer's call, for training and inference, with and without losses), and
``tf.saved_model.load`` rebuilds them all, 3-3.5 s here, although extraction and export call one.
The first run that loads a module saves beside the bottleneck cache (``CACHE/slim/``) a
SavedModel holding only ``features`` (float images -> vectors, the function extraction and the
serving model call) and the module's variables in their order, with a digest of the module's
vectors on a probe batch. Later runs load that copy instead, and use it only when it gives those
vectors bit for bit; a copy that does not is recorded as rejected and never tried again.

Trust: the copy is found by the module's fingerprint (SHA-256 of its files, the same key as the
bottlenecks'), its own files must have the fingerprint recorded when it was made, and it goes
through the same op audit as any module. A copy that fails any of this is ignored and made anew.
Fine-tuning and ``module export`` load the module itself: they need its training function.

Written without deleting anything: the copy goes to a folder of its own name (a uuid), and the
record naming it (``<fingerprint>-<size>.json``) is written atomically; a concurrent run that
made another copy leaves its folder unreferenced, never half-written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .._tf import tf as _tf
from ..errors import ModuleError
from .audit import audit_module

SLIM_FOLDER = "slim"  # in the cache folder (safety.py knows its names)
PROBE_IMAGES = 4
SLIM_VERSION = 2


def _record_path(cache_dir, digest: str, image_size: int | None) -> Path:
    return Path(cache_dir).expanduser() / SLIM_FOLDER / f"{digest[:32]}-{image_size or 'native'}.json"


def _probe_pixels(spec) -> np.ndarray:
    """A fixed batch of noisy images: every channel of every layer gets non-trivial input."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (PROBE_IMAGES, spec.height, spec.width, 3), dtype=np.uint8)


def _digest(vectors: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()


def save_slim(cache_dir, loaded, image_size: int | None) -> Path | None:
    """Save ``loaded``'s slim copy and its record; returns the record, or None when a copy of this
    module was rejected before (then runs keep loading the module itself)."""
    from ..files import write_atomic
    from ..safety import ensure_cache
    from .module import fingerprint

    tf = _tf()
    info = loaded.info
    spec = info.input_spec
    root = Path(cache_dir).expanduser()
    path = _record_path(root, info.fingerprint, image_size)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("rejected") is not None:
            return None  # a copy of this module did not reproduce it once: not tried again
    except (OSError, ValueError, AttributeError):
        pass
    ensure_cache(root)
    listed = list(getattr(loaded.obj, "variables", None) or [])
    features = tf.function(loaded.features, input_signature=[tf.TensorSpec([None, spec.height, spec.width, 3], tf.float32)],
                           autograph=False)
    known = {id(v) for v in listed}
    captured = [v for v in features.get_concrete_function().variables if id(v) not in known]

    class Slim(tf.Module):
        variables = None  # plain attributes, so the SavedModel lists them in this order
        trainable_variables = None

        def __init__(self):
            super().__init__(name="retrain_slim_module")
            self.variables = listed + captured
            self.trainable_variables = []
            self.features = features

    folder = root / SLIM_FOLDER / f"{info.fingerprint[:16]}-{uuid.uuid4().hex}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(Slim(), str(folder))
    # What the copy must give, bit for bit, when a later run loads it (checked there: loading it
    # again here to compare would cost this run as much as the copy saves the next one).
    expected = loaded.pixel_features(tf.constant(_probe_pixels(spec))).numpy()
    record = {"version": SLIM_VERSION, "module_fingerprint": info.fingerprint, "image_size": image_size,
              "folder": folder.name, "files_fingerprint": fingerprint(folder), "input_spec": info.input_spec.to_dict(),
              "feature_dim": info.feature_dim, "trainable_variables": info.trainable_variables,
              "probe": {"images": PROBE_IMAGES, "sha256": _digest(expected)},
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def _reject(path: Path, record: dict, reason: str) -> None:
    from ..files import write_atomic

    write_atomic(path, json.dumps({"version": SLIM_VERSION, "module_fingerprint": record.get("module_fingerprint"),
                                   "rejected": {"reason": reason, "folder": record.get("folder")}}) + "\n")


def load_slim(cache_dir, handle: str, module_path: Path, digest: str, image_size: int | None, audit, allowed_ops):
    """The module's slim copy as a ``LoadedModule``, or None when there is no intact one."""
    from .module import InputSpec, LoadedModule, ModuleInfo, fingerprint, probe_features

    path = _record_path(cache_dir, digest, image_size)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if (record.get("version") != SLIM_VERSION or record.get("module_fingerprint") != digest
                or record.get("rejected") is not None):
            return None
        folder = path.parent / str(record["folder"])
        if "/" in record["folder"] or not folder.is_dir() or fingerprint(folder) != record["files_fingerprint"]:
            return None
        spec_data = record["input_spec"]
        spec = InputSpec(**{**spec_data, "value_range": tuple(spec_data["value_range"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        audit_module(folder, handle, allowed_ops)  # it is a SavedModel too: audited like any
    except ModuleError:
        return None
    tf = _tf()
    copy = tf.saved_model.load(str(folder))
    info = ModuleInfo(handle=handle, path=str(module_path), fingerprint=digest, input_spec=spec,
                      feature_dim=int(record["feature_dim"]), trainable_variables=int(record["trainable_variables"]),
                      audit=audit.to_dict())
    loaded = LoadedModule(info, copy, copy.features)
    got = loaded.pixel_features(tf.constant(_probe_pixels(spec))).numpy()
    if _digest(got) != record.get("probe", {}).get("sha256"):  # never used: extraction must give the module's vectors
        _reject(path, record, "its vectors on the probe batch differ from the module's")
        return None
    loaded.info = replace(info, feature_dim=probe_features(loaded), slim_copy=str(folder), loaded="slim")
    return loaded


__all__ = ["save_slim", "load_slim", "SLIM_FOLDER"]
