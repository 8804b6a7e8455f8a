"""Bottlenecks: the frozen module's output per image, computed once and cached on disk.

Cache layout: ``CACHE_DIR/<module fingerprint[:16]>-<preprocessing key>/<shard>.npz``. A shard
holds the content hashes (keys) and vectors of one batch of writes plus a checksum of both.
Shards are written to a temporary file and renamed into place, so a crash or a concurrent
run never leaves a partial entry; a shard whose checksum fails is set aside and its vectors
recomputed. Keys are SHA-256 of the image bytes, so renamed or duplicated files hit the cache.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import progress
from ._tf import tf as _tf
from .images import iter_image_batches, to_module_input

SHARD_SIZE = 512  # vectors per shard: bounds memory while extracting and the work lost to a kill


def _checksum(keys: np.ndarray, vectors: np.ndarray) -> str:
    digest = hashlib.sha256(keys.tobytes())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()


class BottleneckCache:
    def __init__(self, root: str | os.PathLike, module_fingerprint: str, preprocessing_key: str):
        self.dir = Path(root).expanduser() / f"{module_fingerprint[:16]}-{preprocessing_key}"
        self.corrupt: list[str] = []

    def _shards(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))

    def _read_shard(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                keys, vectors, checksum = data["keys"], data["vectors"], str(data["checksum"])
            if keys.shape[0] != vectors.shape[0] or _checksum(keys, vectors) != checksum:
                raise ValueError("checksum mismatch")
            return keys, vectors
        except Exception:
            self._set_aside(path)
            return None

    def _set_aside(self, path: Path) -> None:
        """Move a damaged shard out of the way (kept for inspection), so its vectors are recomputed."""
        self.corrupt.append(str(path))
        try:
            os.replace(path, path.with_name(f".corrupt-{path.stem}-{uuid.uuid4().hex[:8]}"))
        except OSError:
            pass

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` (content hashes) that are present and intact."""
        wanted = set(keys)
        found: dict[str, np.ndarray] = {}
        for path in self._shards():
            if not wanted:
                break
            shard = self._read_shard(path)
            if shard is None:
                continue
            shard_keys, vectors = shard
            for row, key in enumerate(shard_keys.tolist()):
                if key in wanted:
                    found[key] = vectors[row]
                    wanted.discard(key)
        return found

    def write(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one shard atomically: temporary file, fsync, rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        keys_array = np.asarray(list(keys), dtype="U64")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        checksum = _checksum(keys_array, vectors)
        final = self.dir / f"{checksum[:32]}.npz"
        temporary = self.dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex}.npz"
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, keys=keys_array, vectors=vectors, checksum=np.asarray(checksum))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        finally:
            if temporary.exists():
                temporary.unlink()
        return final

    def info(self) -> dict:
        shards = self._shards()
        return {"path": str(self.dir), "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards)}


def clean_stale_temporaries(root: str | os.PathLike, older_than_s: float = 3600) -> int:
    """Remove temporary shard files left by killed runs (older than an hour, so not a live writer's)."""
    removed = 0
    now = time.time()
    for path in Path(root).expanduser().glob("*/.tmp-*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
        except OSError:
            pass
    return removed


@dataclass
class Bottlenecks:
    vectors: dict[str, np.ndarray]  # content hash -> vector
    hits: int
    misses: int
    skipped: list[dict] = field(default_factory=list)  # {path, reason}
    corrupt_shards: list[str] = field(default_factory=list)
    computed_seconds: float = 0.0


def extract_bottlenecks(images, module, cache: BottleneckCache, batch_size: int = 64, augment=None) -> Bottlenecks:
    """Vectors for ``images`` (dataset.ImageFile): from the cache, computing and storing the misses.

    Identical content is computed once. Vectors go to disk every ``SHARD_SIZE`` images, so
    memory stays flat and a killed run loses at most one shard of work.

    ``augment(pixels, keys) -> pixels``, when given, changes each uint8 batch before the module
    sees it; ``keys`` are the batch's cache keys (``content_hash``), from which it must derive
    its randomness so that what is cached under a key is always the same.
    """
    tf = _tf()
    unique: dict[str, object] = {}
    for image in images:
        unique.setdefault(image.content_hash, image)
    cached = cache.lookup(list(unique))
    todo = [image for key, image in unique.items() if key not in cached]
    result = Bottlenecks(vectors=dict(cached), hits=len(cached), misses=len(todo), corrupt_shards=list(cache.corrupt))
    if not todo:
        return result
    spec = module.info.input_spec

    @tf.function(input_signature=[tf.TensorSpec([None, spec.height, spec.width, 3], tf.uint8)], autograph=False)
    def forward(batch):
        return module.features(to_module_input(batch, spec.value_range))

    started = time.perf_counter()
    pending_keys: list[str] = []
    pending_vectors: list[np.ndarray] = []

    def flush():
        if pending_keys:
            cache.write(pending_keys, np.concatenate(pending_vectors))
            pending_keys.clear()
            pending_vectors.clear()

    with progress.bar(total=len(todo), desc="bottlenecks", unit="img") as bar:
        batches = iter_image_batches(
            [i.path for i in todo], [i.decoder for i in todo], spec.height, spec.width, batch_size
        )
        for indices, pixels, skipped in batches:
            for index, reason in skipped:
                result.skipped.append({"path": todo[index].path, "reason": reason})
            if pixels is not None and len(indices):
                if augment is not None:
                    pixels = augment(pixels, [todo[i].content_hash for i in indices.tolist()])
                vectors = forward(tf.constant(pixels)).numpy()
                for index, vector in zip(indices.tolist(), vectors):
                    key = todo[index].content_hash
                    result.vectors[key] = vector
                    pending_keys.append(key)
                pending_vectors.append(vectors)
                if len(pending_keys) >= SHARD_SIZE:
                    flush()
            bar.update(len(indices) + len(skipped))
        flush()
    result.computed_seconds = time.perf_counter() - started
    return result


def cache_summary(cache_dir: str | os.PathLike | None = None) -> dict:
    from .config import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entries = []
    if root.is_dir():
        for entry in sorted(p for p in root.iterdir() if p.is_dir()):
            shards = sorted(p for p in entry.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))
            vectors = 0
            for shard in shards:
                try:
                    with np.load(shard, allow_pickle=False) as data:
                        vectors += int(data["keys"].shape[0])
                except Exception:
                    pass
            entries.append({
                "name": entry.name,
                "shards": len(shards),
                "vectors": vectors,
                "bytes": sum(p.stat().st_size for p in shards),
            })
    return {"path": str(root), "bytes": sum(e["bytes"] for e in entries), "entries": entries}


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete the cache's shard folders; returns the number of files removed."""
    import shutil

    from .config import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for entry in [p for p in root.iterdir() if p.is_dir()]:
        removed += sum(1 for p in entry.iterdir() if p.is_file())
        shutil.rmtree(entry)
    return removed
