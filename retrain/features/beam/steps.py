"""What the workers of ``retrain extract``'s pipeline run (``features/beam/__init__.py`` has its
picture): the plain, picklable values they are given, the module loaded once per worker process,
and the pipeline's steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import apache_beam as beam  # imported by the package first, with its guard
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from ...errors import ModuleError, first_line

NAMESPACE = "retrain.extract"  # of the pipeline's counters
RAW = CompressionTypes.UNCOMPRESSED  # image bytes as they are: no decompression by file name


@dataclass(frozen=True)
class ModuleSpec:
    """How a worker loads the module: with the launcher's arguments, and it must find the same files."""

    handle: str
    image_size: int | None
    allow_unversioned: bool
    trust_hosts: tuple[str, ...]
    allowed_ops: tuple[str, ...]
    records_dir: str | None
    fingerprint: str


@dataclass(frozen=True)
class CacheTarget:
    """The cache entry the workers fill: a local or shared folder, or an object-store prefix."""

    root: str
    fingerprint: str
    preprocessing_key: str

    @property
    def remote(self) -> bool:
        return FileSystems.get_scheme(self.root) is not None

    @property
    def entry(self) -> str:
        name = f"{self.fingerprint[:16]}-{self.preprocessing_key}"
        return FileSystems.join(self.root, name) if self.remote else str(Path(self.root) / name)

    def shard_paths(self) -> list[str]:
        """The entry's complete shards (temporary and set-aside files have names starting with a dot)."""
        if not self.remote:
            entry = Path(self.entry)
            if not entry.is_dir():
                return []
            return sorted(str(p) for p in entry.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))
        try:
            matched = FileSystems.match([FileSystems.join(self.entry, "*.npz")])[0].metadata_list
        except Exception:  # noqa: BLE001 - an entry not made yet matches nothing (the error type depends on the store)
            return []
        return sorted(m.path for m in matched if not FileSystems.split(m.path)[1].startswith("."))

    def keys_of(self, path: str) -> list[str]:
        """The keys a shard holds ([] when it cannot be read: train sets such a shard aside)."""
        try:
            with FileSystems.open(path, compression_type=RAW) as handle:
                data = io.BytesIO(handle.read())
            with np.load(data, allow_pickle=False) as shard:
                return shard["keys"].tolist()
        except Exception:  # noqa: BLE001 - any damage: the keys count as missing and are computed again
            return []

    def listed_keys(self) -> set[str]:
        keys: set[str] = set()
        for path in self.shard_paths():
            keys.update(self.keys_of(path))
        return keys

    def write(self, keys: list[str], vectors: np.ndarray) -> str:
        if not self.remote:
            from ..bottlenecks import BottleneckCache

            return str(BottleneckCache(self.root, self.fingerprint, self.preprocessing_key).write(keys, vectors))
        return write_remote_shard(self.entry, keys, vectors)


def write_remote_shard(entry: str, keys: list[str], vectors: np.ndarray) -> str:
    """A shard as ``BottleneckCache.write`` makes it (same members, checksum and name), created
    through FileSystems: an object store publishes the object only when it is closed."""
    from ..bottlenecks import _checksum

    keys_array = np.asarray(list(keys), dtype="U64")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    checksum = _checksum(keys_array, vectors)
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys_array, vectors=vectors, checksum=np.asarray(checksum))
    path = FileSystems.join(entry, f"{checksum[:32]}.npz")
    with FileSystems.create(path, mime_type="application/octet-stream", compression_type=RAW) as handle:
        handle.write(buffer.getvalue())
    return path


# --- the module: in the launcher and once per worker process --------------------------------------


def _is_store_path(handle: str) -> bool:
    """An object-store folder (gs://, s3://, ...): the user's own storage, copied like a local folder.
    http(s) handles are TF Hub style URLs, which load_module resolves under the trust policy."""
    scheme = FileSystems.get_scheme(handle)
    return scheme is not None and scheme not in ("http", "https")


def _copy_module(handle: str, folder: str) -> str:
    """Copy an object-store module folder into the local ``folder``; returns the local path."""
    root = handle.rstrip("/")
    matched = FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list
    if not matched:
        raise ModuleError(f"module {handle}: no files there (expected a SavedModel folder)")
    for metadata in matched:
        relative = metadata.path[len(root):].lstrip("/")
        target = Path(folder) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileSystems.open(metadata.path, compression_type=RAW) as source, open(target, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                out.write(chunk)
    return folder


def load_for_extraction(spec: ModuleSpec):
    """``load_module`` with the launcher's arguments (trust policy, op audit); an object-store
    module is copied to a temporary folder first, which lives as long as the loaded module."""
    from ..module import load_module

    copy = None
    handle = spec.handle
    if _is_store_path(handle):
        copy = tempfile.TemporaryDirectory(prefix="retrain-module-")
        handle = _copy_module(spec.handle, copy.name)
    loaded = load_module(handle, spec.image_size, spec.allow_unversioned, spec.trust_hosts,
                         records_dir=spec.records_dir, allowed_ops=spec.allowed_ops)
    loaded.local_copy = copy  # removed with the loaded module
    if copy is not None:  # the record names the user's handle, not the temporary copy
        loaded.info = replace(loaded.info, handle=spec.handle)
    if spec.fingerprint and loaded.info.fingerprint != spec.fingerprint:
        raise ModuleError(
            f"module {spec.handle} has fingerprint {loaded.info.fingerprint[:12]} on this worker but "
            f"{spec.fingerprint[:12]} where the pipeline started: every worker must load the same files"
        )
    return loaded


# --- the pipeline's steps --------------------------------------------------------------------------


SKIPPED = "skipped"  # the tagged output of every step that can pass over a file


def _skip(path: str, reason: str):
    """A skipped file, as the step's ``skipped`` output (written to the run folder, read by the
    launcher): Beam's DirectRunner keeps only one worker's string-set metric, so not a metric."""
    Metrics.counter(NAMESPACE, "skipped").inc()
    return beam.pvalue.TaggedOutput(SKIPPED, json.dumps([path, reason]))


def read_file(path: str) -> bytes:
    with FileSystems.open(path, compression_type=RAW) as handle:
        return handle.read()


def _cannot_read(error: Exception) -> str:
    return f"cannot read: {getattr(error, 'strerror', None) or first_line(error)}"


class MatchedFilter(beam.DoFn):
    """Paths the workers matched (globs): the folder scan's rules, applied here. Under a folder
    ``root`` an image must lie in a class sub-folder; hidden and system files are passed over."""

    def __init__(self, root: str | None):
        self.root = root.rstrip("/") if root else None

    def process(self, path: str):
        from ...data.dataset import _is_ignored
        from ...data.images import IMAGE_EXTENSIONS

        relative = path[len(self.root):].lstrip("/") if self.root and path.startswith(self.root) else path
        parts = [p for p in relative.replace("\\", "/").split("/") if p]
        if not parts or any(_is_ignored(p) for p in (parts if self.root else parts[-1:])):
            return
        if self.root and len(parts) < 2:
            yield _skip(path, "not inside a class folder")
            return
        suffix = os.path.splitext(parts[-1])[1]
        if suffix.lower() not in IMAGE_EXTENSIONS:
            yield _skip(path, f"not an image file extension ({suffix or 'none'})")
            return
        yield path


class HashFiles(beam.DoFn):
    """path -> (content hash, path); files whose content is cached, or that cannot be images, stop here."""

    def __init__(self, target: CacheTarget):
        self.target = target

    def setup(self):
        self.cached = self.target.listed_keys()  # what this worker's share of the paths need not compute

    def process(self, path: str):
        from ...data.images import probe_image

        Metrics.counter(NAMESPACE, "images").inc()
        try:
            data = read_file(path)
        except Exception as error:  # noqa: BLE001 - each file system raises its own errors
            yield _skip(path, _cannot_read(error))
            return
        problem = probe_image(data).problem
        if problem:
            yield _skip(path, problem)
            return
        key = hashlib.sha256(data).hexdigest()
        if key in self.cached:
            Metrics.counter(NAMESPACE, "already_cached").inc()
            return
        yield key, path


class FirstPath(beam.DoFn):
    """(key, paths) -> (key, path): identical files are computed once, as the smallest path."""

    def process(self, item):
        key, paths = item
        paths = sorted(paths)
        if len(paths) > 1:
            Metrics.counter(NAMESPACE, "duplicates").inc(len(paths) - 1)
        yield key, paths[0]


class DecodeFiles(beam.DoFn):
    """(key, path) -> (key, uint8 [H, W, 3]) through the one preprocessing path."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def process(self, item):
        from ...data.images import decode_to_size

        key, path = item
        try:
            data = read_file(path)
        except Exception as error:  # noqa: BLE001 - as in HashFiles
            yield _skip(path, _cannot_read(error))
            return
        if hashlib.sha256(data).hexdigest() != key:  # its vector would be cached under another file's key
            yield _skip(path, "the file changed while the pipeline ran")
            return
        try:
            pixels = decode_to_size(data, self.height, self.width)
        except ValueError as error:
            yield _skip(path, str(error))
            return
        yield key, pixels


class Embed(beam.DoFn):
    """Batches of (key, pixels) -> vectors, written to the cache in shards of ``shard_size``.

    The module is loaded once per worker process (Beam's Shared handle: a worker runs several
    bundles at once, each with its own DoFn instance) and called as train's extraction calls it."""

    def __init__(self, module: ModuleSpec, target: CacheTarget, shard_size: int, handle: shared.Shared):
        self.module_spec, self.target, self.shard_size, self.handle = module, target, shard_size, handle

    def setup(self):
        self.module = None  # loaded with the first batch: a worker with nothing to compute loads nothing
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []

    def _load(self):
        Metrics.counter(NAMESPACE, "module_loads").inc()  # once per worker process
        return load_for_extraction(self.module_spec)

    def start_bundle(self):
        self.keys, self.vectors = [], []

    def process(self, batch):
        from ..._tf import tf

        if self.module is None:
            self.module = self.handle.acquire(self._load)
        keys = [key for key, _ in batch]
        pixels = tf().constant(np.stack([p for _, p in batch]))
        self.keys.extend(keys)
        self.vectors.append(self.module.pixel_features(pixels).numpy())
        if len(self.keys) >= self.shard_size:
            self._flush(whole_shards_only=True)
        return []

    def finish_bundle(self):
        self._flush(whole_shards_only=False)

    def _flush(self, whole_shards_only: bool):
        """Write the vectors held in shards of ``shard_size``; the rest waits for the next batch,
        unless the bundle ends (a bundle's outputs must be written before it is done)."""
        if not self.keys:
            return
        keys, vectors = self.keys, np.concatenate(self.vectors)
        end = len(keys) - len(keys) % self.shard_size if whole_shards_only else len(keys)
        for start in range(0, end, self.shard_size):
            stop = min(start + self.shard_size, end)
            self.target.write(keys[start:stop], vectors[start:stop])
            Metrics.counter(NAMESPACE, "computed").inc(stop - start)
            Metrics.counter(NAMESPACE, "shards").inc()
        self.keys, self.vectors = keys[end:], ([vectors[end:]] if end < len(keys) else [])
