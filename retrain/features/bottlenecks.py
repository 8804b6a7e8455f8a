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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import progress
from ..data.images import iter_image_batches
from ..safety import TEMPORARY_SHARD, cache_entries, check_cache_folder, ensure_cache, remove_entry_files

SHARD_SIZE = 512  # vectors per shard: bounds memory while extracting and the work lost to a kill


def _checksum(keys: np.ndarray, vectors: np.ndarray) -> str:
    digest = hashlib.sha256(keys.tobytes())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()


class BottleneckCache:
    def __init__(self, root: str | os.PathLike, module_fingerprint: str, preprocessing_key: str):
        self.root = Path(root).expanduser()
        self.dir = self.root / f"{module_fingerprint[:16]}-{preprocessing_key}"
        self.corrupt: list[str] = []
        self._tagged = False

    def _shards(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))

    def _set_aside(self, path: Path) -> None:
        """Move a damaged shard out of the way (kept for inspection), so its vectors are recomputed."""
        self.corrupt.append(str(path))
        try:
            os.replace(path, path.with_name(f".corrupt-{path.stem}-{uuid.uuid4().hex[:8]}"))
        except OSError:
            pass

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` (content hashes) that are present and intact."""
        found: dict[str, np.ndarray] = {}
        for shard_keys, vectors in self.iter_cached(keys):
            found.update(zip(shard_keys, vectors))
        return found

    def iter_cached(self, keys: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(keys, vectors [n, dim])`` per intact shard, for the wanted ``keys`` it holds (each once).

        A shard's vectors are read, and its checksum verified, only when its keys include a
        wanted one: a large cache of other images costs a read of their keys, not of their vectors.
        """
        wanted = set(keys)
        for path in self._shards():
            if not wanted:
                break
            try:
                with np.load(path, allow_pickle=False) as data:
                    shard_keys = data["keys"]
                    listed = shard_keys.tolist()
                    if wanted.isdisjoint(listed):
                        continue
                    vectors, checksum = data["vectors"], str(data["checksum"])
                if shard_keys.shape[0] != vectors.shape[0] or _checksum(shard_keys, vectors) != checksum:
                    raise ValueError("checksum mismatch")
            except Exception:  # noqa: BLE001 - any damage (bad zip, missing member, bad array) sets the shard aside
                self._set_aside(path)
                continue
            hits, rows = [], []
            for row, key in enumerate(listed):
                if key in wanted:
                    wanted.discard(key)
                    hits.append(key)
                    rows.append(row)
            yield hits, vectors[rows]

    def write(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one shard atomically: temporary file, fsync, rename."""
        if not self._tagged:  # the cache folder is checked (and tagged) before its first write
            ensure_cache(self.root)
            self._tagged = True
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
    """Remove temporary shard files left by killed runs (older than an hour, so not a live writer's).

    Only files with the temporary shards' own names, in the cache's entry folders, of a folder
    that is a retrain cache."""
    root = check_cache_folder(root)
    now = time.time()
    removed = 0
    for entry in cache_entries(root):
        stale = []
        for path in entry.iterdir():
            try:
                if TEMPORARY_SHARD.fullmatch(path.name) and now - path.lstat().st_mtime > older_than_s:
                    stale.append(path)
            except OSError:
                pass
        removed += remove_entry_files(entry, stale)
    return removed


class VectorStore(Mapping):
    """Vectors by key, kept in an anonymous temporary file rather than in memory.

    Extraction appends each batch's vectors here as it goes, so its memory does not grow with
    the number of images; reading maps the file. The file lives beside the cache shards (on
    the same disk; the system's temporary folder when that is read-only) and has no name, so
    nothing is left behind when the process ends, however it ends.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = directory
        self._file = None
        self._rows: dict[str, int] = {}
        self._count = 0
        self._dim = 0
        self._mapped = None
        self._mapped_rows = 0

    def _open(self):
        import tempfile

        if self._directory is not None:
            try:
                Path(self._directory).mkdir(parents=True, exist_ok=True)
                return tempfile.TemporaryFile(dir=self._directory, prefix=".tmp-vectors-")
            except OSError:
                pass
        return tempfile.TemporaryFile(prefix="retrain-vectors-")

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Append ``vectors`` [n, dim] under ``keys``; a key added again points at its newest row."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if not len(keys):
            return
        if self._file is None:
            self._file = self._open()
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} added to a store of dimension {self._dim}")
        self._file.write(vectors.tobytes())
        self._rows.update(zip(keys, range(self._count, self._count + len(keys))))
        self._count += len(keys)

    def __getitem__(self, key: str) -> np.ndarray:
        row = self._rows[key]
        if row >= self._mapped_rows:
            self._file.flush()
            self._mapped = np.memmap(self._file, dtype=np.float32, mode="r", shape=(self._count, self._dim))
            self._mapped_rows = self._count
        return np.array(self._mapped[row])

    def __contains__(self, key) -> bool:
        return key in self._rows

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


@dataclass
class Bottlenecks:
    vectors: VectorStore  # content hash -> vector (a Mapping)
    hits: int
    misses: int
    skipped: list[dict] = field(default_factory=list)  # {path, reason}
    corrupt_shards: list[str] = field(default_factory=list)


def extract_bottlenecks(images, module, cache: BottleneckCache, batch_size: int = 64, augment=None) -> Bottlenecks:
    """Vectors for ``images`` (dataset.ImageFile): from the cache, computing and storing the misses.

    Identical content is computed once. Vectors go to disk every ``SHARD_SIZE`` images, so
    memory stays flat and a killed run loses at most one shard of work; the result's vectors
    are read back from disk (see ``VectorStore``).

    The hot path has no Python per image: decoding runs in parallel ahead of the module
    (``iter_image_batches``), each batch goes to the module as a tensor, and while one batch
    is computed the previous one's vectors are stored and shards are written by another thread.

    ``augment(pixels, keys) -> pixels``, when given, changes each uint8 batch before the module
    sees it; ``keys`` are the batch's cache keys (``content_hash``), from which it must derive
    its randomness so that what is cached under a key is always the same.
    """
    unique: dict[str, object] = {}
    for image in images:
        unique.setdefault(image.content_hash, image)
    store = VectorStore(cache.dir)
    hits = 0
    for keys, vectors in cache.iter_cached(list(unique)):
        store.add(keys, vectors)
        hits += len(keys)
    todo = [image for key, image in unique.items() if key not in store]
    result = Bottlenecks(vectors=store, hits=hits, misses=len(todo), corrupt_shards=list(cache.corrupt))
    if not todo:
        return result
    spec = module.info.input_spec
    todo_keys = [image.content_hash for image in todo]
    with _ShardWriter(cache, store) as shards, progress.bar(total=len(todo), desc="bottlenecks", unit="img") as bar:
        batches = iter_image_batches(
            [i.path for i in todo], [i.decoder for i in todo], spec.height, spec.width, batch_size, as_tensors=True
        )
        in_flight = None  # the batch the module is computing; read back after the next one is queued
        for indices, pixels, skipped in batches:
            for index, reason in skipped:
                result.skipped.append({"path": todo[index].path, "reason": reason})
            if pixels is not None and len(indices):
                keys = [todo_keys[index] for index in indices.tolist()]
                if augment is not None:
                    pixels = augment(pixels, keys)
                computing = (keys, module.pixel_features(pixels))
                if in_flight is not None:
                    shards.add(*in_flight)
                in_flight = computing
            bar.update(len(indices) + len(skipped))
        if in_flight is not None:
            shards.add(*in_flight)
    return result


class _ShardWriter:
    """Adds computed vectors to the run's store and writes them to the cache in shards of
    ``SHARD_SIZE``, on another thread, one shard in flight at most (memory stays bounded).
    Leaving the block writes what is left and waits for it."""

    def __init__(self, cache: BottleneckCache, store: VectorStore):
        self.cache, self.store = cache, store
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.writing = None

    def __enter__(self):
        return self

    def add(self, keys: list[str], features) -> None:
        vectors = features.numpy()
        self.store.add(keys, vectors)
        self.keys.extend(keys)
        self.vectors.append(vectors)
        if len(self.keys) >= SHARD_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self.keys:
            if self.writing is not None:
                self.writing.result()
            self.writing = self.writer.submit(self.cache.write, list(self.keys), np.concatenate(self.vectors))
            self.keys.clear()
            self.vectors.clear()

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                self._flush()
                if self.writing is not None:
                    self.writing.result()
        finally:
            self.writer.shutdown(wait=True)
        return False


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    from ..config import default_cache_dir

    return check_cache_folder(cache_dir if cache_dir else default_cache_dir())


def cache_summary(cache_dir: str | os.PathLike | None = None) -> dict:
    """Entries of a retrain cache (a folder that is not one is refused, see safety.py)."""
    root = _cache_root(cache_dir)
    entries = []
    for entry in cache_entries(root):
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
    """Delete the cache's bottleneck files; returns the number of files removed.

    Only files with the cache's own names in its entry folders go (then the folders, when
    empty); the tag and the module fingerprint records stay, and so does anything else."""
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return 0
    ensure_cache(root)  # an untagged cache with the cache's layout gets its tag
    return sum(remove_entry_files(entry) for entry in cache_entries(root))
