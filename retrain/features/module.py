"""Resolve, trust, load and describe a module (a SavedModel mapping images to feature vectors).

A handle is executed code. It is either a local SavedModel folder, or a URL on a trusted host
(tfhub.dev and Kaggle Models by default) resolved through tensorflow-hub's resolver and its
cache (``TFHUB_CACHE_DIR``). Published versions are immutable, so a URL must name a version
unless the user insists. The fingerprint (SHA-256 over the module's files) is recorded with
every model and is part of every bottleneck's cache key. The first fingerprint seen for each
versioned URL is kept in ``CACHE_DIR/modules.json``; a later load of that URL whose files differ
means a damaged or altered TF Hub cache entry, and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .._tf import keras_registrations
from .._tf import tf as _tf
from ..errors import ModuleError, first_line
from .audit import AuditResult, UnreadableSavedModel, audit_module
from ..safety import MODULE_RECORDS  # in the bottleneck cache folder: first fingerprint per versioned URL

TRUSTED_HOSTS = ("tfhub.dev", "www.kaggle.com", "kaggle.com")
DEFAULT_VALUE_RANGE = (0.0, 1.0)  # TF Hub image modules take RGB floats in [0, 1]
CLASSIFIER_OUTPUT_DIMS = (1000, 1001)  # ImageNet logits: not a feature vector


@dataclass(frozen=True)
class InputSpec:
    """What the module expects; decides the preprocessing everywhere."""

    height: int
    width: int
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE
    resize: str = "bilinear"

    def key(self) -> str:
        from ..data.images import PREPROCESSING_VERSION

        text = f"{self.height}x{self.width}|{self.value_range[0]:g},{self.value_range[1]:g}|{self.resize}|v{PREPROCESSING_VERSION}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["value_range"] = list(self.value_range)
        return data


@dataclass(frozen=True)
class ModuleInfo:
    handle: str
    path: str
    fingerprint: str
    input_spec: InputSpec
    feature_dim: int
    trainable_variables: int
    audit: dict | None = None  # what audit.audit_module read: functions walked, op types, ops accepted
    slim_copy: str | None = None  # the slim copy loaded instead of the module (slim.py), if one was
    loaded: str = "full"  # "full", "partial" (only __call__ and the variable lists) or "slim" (slim.py)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_spec"] = self.input_spec.to_dict()
        return data


class LoadedModule:
    """A loaded module and the one way this program calls it."""

    def __init__(self, info: ModuleInfo, obj, call):
        self.info = info
        self.obj = obj
        self._call = call
        self._pixel_features = None

    def features(self, images_float):
        """float32 images in the module's value range -> [batch, dim] features (inference mode)."""
        return self._call(images_float)

    @property
    def pixel_features(self):
        """uint8 batch [n, H, W, 3] -> features: the module called through one traced function,
        traced once per loaded module (the cast and scaling run on the module's device, beside
        it). Extraction calls it; ``load_module`` probes the module through it, so the graph's
        one-time set-up on the first call is paid once."""
        if self._pixel_features is None:
            from ..data.images import to_module_input

            tf = _tf()
            spec = self.info.input_spec
            self._pixel_features = tf.function(
                lambda batch: self.features(to_module_input(batch, spec.value_range)),
                input_signature=[tf.TensorSpec([None, spec.height, spec.width, 3], tf.uint8)],
                autograph=False,
            )
        return self._pixel_features


def is_url(handle: str) -> bool:
    return urlparse(handle).scheme in ("http", "https", "gs")


def check_trusted(handle: str, allow_unversioned: bool = False, trusted_hosts: tuple[str, ...] = TRUSTED_HOSTS) -> None:
    """Refuse URL handles from untrusted hosts, and unversioned ones unless asked."""
    parsed = urlparse(handle)
    if parsed.scheme not in ("https", "http"):
        raise ModuleError(f"module handle {handle}: only https URLs on {', '.join(trusted_hosts)} or local folders are loaded")
    host = (parsed.hostname or "").lower()
    if host not in trusted_hosts:
        raise ModuleError(
            f"module host {host} is not trusted (modules are executed code); trusted: {', '.join(trusted_hosts)}; "
            f"pass --trust-host {host} if you trust it"
        )
    if not allow_unversioned and not is_versioned(handle):
        raise ModuleError(
            f"module handle {handle} names no version: published versions are immutable, so add one "
            f"(e.g. {handle.rstrip('/')}/1) or pass --allow-unversioned"
        )


def resolve_handle(handle: str, allow_unversioned: bool = False, trust_hosts: tuple[str, ...] = ()) -> Path:
    """Handle -> local SavedModel folder (downloading into the TF Hub cache for URLs)."""
    if is_url(handle):
        check_trusted(handle, allow_unversioned, TRUSTED_HOSTS + tuple(trust_hosts))
        import tensorflow_hub as hub

        try:
            path = Path(hub.resolve(handle))
        except Exception as error:  # resolver errors are URLError, HTTPError, ValueError...
            cache = os.environ.get("TFHUB_CACHE_DIR", "the TF Hub cache (set TFHUB_CACHE_DIR)")
            reason = str(getattr(error, "reason", "") or error).splitlines()[0][:160]
            raise ModuleError(
                f"cannot download module {handle} ({reason}); offline? Download it where there is a "
                f"network and pass its folder, or place it in {cache}"
            ) from None
    else:
        path = Path(handle).expanduser()
        if not path.exists():
            raise ModuleError(f"module {handle} does not exist (expected a SavedModel folder or a versioned URL)")
        if not path.is_dir():
            raise ModuleError(f"module {handle} is not a folder (expected a SavedModel folder)")
    if (path / "tfhub_module.pb").exists() and not (path / "saved_model.pb").exists():
        raise ModuleError(f"module {handle} is in the TF1 Hub format: a TF2 SavedModel feature_vector module is needed")
    if not ((path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists()):
        if is_url(handle):
            raise damaged_cache_entry(handle, path, "no saved_model.pb")
        raise ModuleError(f"module {handle} is not a SavedModel: {path} has no saved_model.pb")
    return path


def damaged_cache_entry(handle: str, path: Path, reason: str) -> ModuleError:
    return ModuleError(
        f"module cache entry {path} for {handle} is damaged ({reason}): delete that folder and run again to download it anew"
    )


def is_versioned(handle: str) -> bool:
    return bool(re.search(r"/\d+/?$", urlparse(handle).path))


def check_recorded_fingerprint(handle: str, path: Path, digest: str, records_dir: str | os.PathLike) -> None:
    """Published versions never change: a versioned URL must always load the same files.

    The first fingerprint seen for a versioned URL is recorded in ``records_dir/modules.json``;
    a different one later means the TF Hub cache entry was damaged or altered.
    """
    from ..files import write_atomic
    from ..safety import check_cache_folder, ensure_cache

    if not is_versioned(handle):
        return
    records_file = check_cache_folder(records_dir) / MODULE_RECORDS
    try:
        records = json.loads(records_file.read_text(encoding="utf-8"))
        if not isinstance(records, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        records = {}
    except (OSError, ValueError):
        records = {}  # an unreadable record file is rewritten: it only ever adds protection
    known = records.get(handle, {}).get("fingerprint") if isinstance(records.get(handle), dict) else None
    if known is None:
        records[handle] = {"fingerprint": digest, "first_seen": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        ensure_cache(records_file.parent)
        write_atomic(records_file, json.dumps(records, indent=1, sort_keys=True) + "\n")
    elif known != digest:
        raise damaged_cache_entry(
            handle, path, f"its files have fingerprint {digest[:12]}, but this version was first loaded as {known[:12]}"
        )


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over the module's files (relative names and bytes), independent of where it lies."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _call_and_spec(obj):
    """Find how to call a loaded SavedModel and the spec of its image input."""
    call_fn = obj.restored_call if isinstance(obj, PartialModule) else getattr(obj, "__call__", None)
    concrete = getattr(call_fn, "concrete_functions", None)
    if concrete:
        spec, takes_training = None, False
        for function in concrete:
            args = function.structured_input_signature[0]
            if args and hasattr(args[0], "shape"):
                spec = args[0]
                takes_training = takes_training or len(args) > 1
        if spec is not None:
            if takes_training:
                return (lambda x: obj(x, training=False)), spec
            return (lambda x: obj(x)), spec
    signatures = getattr(obj, "signatures", {}) or {}
    for name in ("default", "serving_default"):
        if name in signatures:
            signature = signatures[name]
            inputs = signature.structured_input_signature[1]
            if len(inputs) != 1:
                raise ModuleError(f"module signature {name!r} takes {len(inputs)} inputs: an image-only module is needed")
            (input_name, spec), = inputs.items()
            outputs = signature.structured_outputs
            out_key = next((k for k in ("feature_vector", "default", "output_0") if k in outputs), None)
            if out_key is None and len(outputs) == 1:
                out_key = next(iter(outputs))
            if out_key is None:
                raise ModuleError(f"module signature {name!r} has outputs {sorted(outputs)}: cannot tell which is the feature vector")
            return (lambda x: signature(**{input_name: x})[out_key]), spec
    raise ModuleError("module has neither a callable __call__ nor a 'default' / 'serving_default' signature")


def resolve_input_spec(spec, image_size: int | None) -> InputSpec:
    """The module's fixed size, or the user's size for a variable-size module."""
    shape = list(spec.shape)
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise ModuleError(f"module input has shape {shape}: an image module taking [batch, height, width, 3] is needed")
    if spec.dtype != _tf().float32:
        raise ModuleError(f"module input has dtype {spec.dtype.name}: a float32 image module is needed")
    height, width = shape[1], shape[2]
    if height is None or width is None:
        if image_size is None:
            raise ModuleError("module accepts any image size: pass --image-size (e.g. 224)")
        return InputSpec(image_size, image_size)
    if image_size is not None and (image_size, image_size) != (height, width):
        raise ModuleError(f"module needs {height}x{width} images, but --image-size {image_size} was given")
    return InputSpec(int(height), int(width))


def check_module(handle: str, allow_unversioned: bool = False, trust_hosts: tuple[str, ...] = (),
                 allowed_ops=()) -> tuple[Path, AuditResult]:
    """Resolve a handle and audit the module's ops (audit.py) without running any of it: what
    refuses a module before any image is read."""
    path = resolve_handle(str(handle), allow_unversioned, trust_hosts)
    try:
        return path, audit_module(path, str(handle), allowed_ops)
    except UnreadableSavedModel as error:
        if is_url(str(handle)):
            raise damaged_cache_entry(str(handle), path, f"it cannot be loaded: {error.reason}") from None
        raise


def load_module(handle: str, image_size: int | None = None, allow_unversioned: bool = False,
                trust_hosts: tuple[str, ...] = (), records_dir: str | os.PathLike | None = None,
                allowed_ops=(), slim_dir: str | os.PathLike | None = None,
                checked: tuple[Path, AuditResult] | None = None, on_traced=None) -> LoadedModule:
    """Resolve, audit, load and check a feature-vector module.

    No function of the module runs before its ops are audited (``check_module``); ``allowed_ops``
    names refused ops the user accepts. For URL handles the fingerprint is checked against
    ``records_dir`` (default: the bottleneck cache folder), see ``check_recorded_fingerprint``.

    ``slim_dir`` (a cache folder): load the module's slim copy from there when one was made for
    this fingerprint, else load the module and make one (see ``slim.py``): only for callers that
    run the inference function alone (extraction, export), not fine-tuning or publishing.

    ``checked``: what ``check_module`` returned for this handle and ``allowed_ops`` earlier in the
    same run (``train`` checks before scanning the images), so it is not resolved and audited twice;
    with the module's ``fingerprint`` as a third item when that was computed too.

    ``on_traced``: called with the LoadedModule once it is set up and before the probe runs it
    (``train`` starts the module's LiteRT conversion there, beside the probe: features/lite.py);
    its ``info.feature_dim`` is filled in by the probe.
    """
    handle = str(handle)
    path, audit, *known = checked or check_module(handle, allow_unversioned, trust_hosts, allowed_ops)
    digest = known[0] if known else fingerprint(path)
    if is_url(handle):
        from ..config import default_cache_dir

        check_recorded_fingerprint(handle, path, digest, records_dir or default_cache_dir())
    if slim_dir is not None:
        from .slim import load_slim_copy

        copy, folder = load_slim_copy(slim_dir, handle, path, digest, allowed_ops)
        if copy is not None:
            return _described(handle, path, digest, image_size, audit, copy, "slim", str(folder), on_traced)
        return _load_full(handle, path, digest, image_size, audit, partial=True, on_traced=on_traced)
    return _load_full(handle, path, digest, image_size, audit, on_traced=on_traced)


class PartialModule:
    """What ``load_partial`` restored of a module: its ``__call__`` and the variable lists, shaped
    like a loaded module for the code that uses one (extraction, the serving model)."""

    PARTS = ("__call__", "variables", "trainable_variables", "regularization_losses")

    def __init__(self, parts: dict):
        self.restored_call = parts["root.__call__"]
        self.variables = list(parts.get("root.variables", None) or [])
        self.trainable_variables = list(parts.get("root.trainable_variables", None) or [])
        self.regularization_losses = list(parts.get("root.regularization_losses", None) or [])

    def __call__(self, *args, **kwargs):
        return self.restored_call(*args, **kwargs)

    @classmethod
    def load(cls, path, children: tuple[str, ...]) -> "PartialModule":
        """``load_partial`` of the SavedModel at ``path`` (whose root has ``children``); raises what
        it raises (ValueError: ``__call__`` needs objects beyond the variable lists)."""
        from tensorflow.python.saved_model.load import load_partial

        _tf()
        return cls(load_partial(str(path), [f"root.{name}" for name in cls.PARTS if name in children]))


def _load_partial(path: Path, children: tuple[str, ...]):
    """Only the module's ``__call__`` and variable lists, when it has a ``__call__`` that needs no
    other object (a TF Hub style module lists all its variables); else None (the caller loads it all).

    A published module holds every function it was saved with (MobileNetV2 0.35: 627, each Keras
    layer's call for training and inference) and ``tf.saved_model.load`` rebuilds them all;
    ``load_partial`` rebuilds what the named children need. Measured here (busy machine): 4.3 s
    for the whole module, 2.4-2.5 s for these parts, with the same vectors bit for bit."""
    if "__call__" not in children:
        return None
    try:
        return PartialModule.load(path, children)
    except ValueError:  # __call__ needs objects beyond these lists (no complete `variables`): load it all
        return None


def _load_full(handle: str, path: Path, digest: str, image_size: int | None, audit: AuditResult,
               partial: bool = False, on_traced=None) -> LoadedModule:
    """The module itself; ``partial``: only what extraction and export call (``_load_partial``)."""
    tf = _tf()
    try:
        obj = _load_partial(path, audit.root_children) if partial else None
        if obj is None:
            keras_registrations()  # a module's objects may be Keras's: registered before the whole load
            obj = tf.saved_model.load(str(path))
    except Exception as error:
        first = first_line(error)
        if is_url(handle):
            raise damaged_cache_entry(handle, path, f"it cannot be loaded: {first}") from None
        raise ModuleError(f"module {handle} cannot be loaded as a SavedModel: {first}") from None
    return _described(handle, path, digest, image_size, audit, obj,
                      "partial" if isinstance(obj, PartialModule) else "full", on_traced=on_traced)


def _described(handle: str, path: Path, digest: str, image_size: int | None, audit: AuditResult, obj,
               loaded: str, slim_copy: str | None = None, on_traced=None) -> LoadedModule:
    """A loaded module object, its call traced once and probed (its input size, its vector size)."""
    tf = _tf()
    call, spec = _call_and_spec(obj)
    input_spec = resolve_input_spec(spec, image_size)
    traced = tf.function(
        call, input_signature=[tf.TensorSpec([None, input_spec.height, input_spec.width, 3], tf.float32)], autograph=False
    )
    info = ModuleInfo(handle=handle, path=str(path), fingerprint=digest, input_spec=input_spec, feature_dim=0,
                      trainable_variables=len(getattr(obj, "trainable_variables", []) or []), audit=audit.to_dict(),
                      slim_copy=slim_copy, loaded=loaded)
    module = LoadedModule(info, obj, traced)
    if on_traced is not None:
        on_traced(module)
    module.info = replace(info, feature_dim=probe_features(module))
    return module


def probe_features(loaded: LoadedModule) -> int:
    """Run the module once through ``pixel_features`` (paying its graph set-up once) and check it
    gives feature vectors; returns their dimension."""
    tf = _tf()
    handle, input_spec = loaded.info.handle, loaded.info.input_spec
    probe = np.zeros((2, input_spec.height, input_spec.width, 3), np.uint8)
    try:
        output = loaded.pixel_features(tf.constant(probe))
    except Exception as error:
        first = first_line(error)
        raise ModuleError(f"module {handle} failed on a {input_spec.height}x{input_spec.width} image batch: {first}") from None
    if isinstance(output, dict):
        raise ModuleError(f"module {handle} returns a dict {sorted(output)}: a feature_vector module is needed")
    shape = list(output.shape)
    if len(shape) != 2:
        raise ModuleError(
            f"module {handle} outputs shape {shape}, not a feature vector [batch, dim]: "
            "use a feature_vector module (spatially pooled)"
        )
    if shape[1] in CLASSIFIER_OUTPUT_DIMS:
        raise ModuleError(
            f"module {handle} outputs {shape[1]} values per image, which looks like classification logits: "
            "a feature_vector module is needed"
        )
    return int(shape[1])
