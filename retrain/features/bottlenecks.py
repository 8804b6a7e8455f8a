"""Bottlenecks: the frozen module's output per image, computed once and cached on disk.

Cache layout: ``CACHE_DIR/<module fingerprint[:16]>-<preprocessing key>/<shard>.npz``. A shard
holds the content hashes (keys) and vectors of one batch of writes plus a checksum of both.
Shards are written to a temporary file and renamed into place, so a crash or a concurrent
run never leaves a partial entry; a shard whose checksum fails is set aside and its vectors
recomputed. Keys are SHA-256 of the image bytes, so renamed or duplicated files hit the cache.
Each shard has a key file beside it and the entry a compacted index of them (their format:
``cache_index.py``): a lookup reads the shards holding the keys asked for, whatever the size of the cache.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import progress
from ..data.images import iter_image_batches
from ..errors import OutputError
from ..safety import (SHARD_KEYS_NAME, SHARD_NAME, TEMPORARY_SHARD, cache_entries, check_cache_folder, clear_converted,
                      ensure_cache, remove_entry_files)
from .cache_index import (INDEX_FILE, KEY_DTYPE, KEY_WIDTH, KEYS_SUFFIX, Index, key_array, key_file_bytes, read_index,
                          read_key_file, write_durably, write_index)
from .vectors import VectorStore

SHARD_SIZE = 512  # vectors per shard: bounds memory while extracting and the work lost to a kill
COMPACT_EVERY = 64  # shards outside the compacted index before a lookup merges them in (32k vectors)


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

    def _listing(self) -> tuple[set[str], set[str]]:
        """One listing of the entry: the shards' names (without ``.npz``) and those of their key files."""
        shards, keyed = set(), set()
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if SHARD_NAME.fullmatch(entry.name):
                        shards.add(entry.name[:-4])
                    elif SHARD_KEYS_NAME.fullmatch(entry.name):
                        keyed.add(entry.name[:-len(KEYS_SUFFIX)])
        except (FileNotFoundError, NotADirectoryError):
            pass
        return shards, keyed

    def _set_aside(self, path: Path) -> None:
        """Move a damaged shard out of the way (kept for inspection), so its vectors are recomputed."""
        self.corrupt.append(str(path))
        try:
            os.replace(path, path.with_name(f".corrupt-{path.stem}-{uuid.uuid4().hex[:8]}"))
        except OSError:
            pass

    def _ensure_tagged(self) -> None:
        """The cache folder is checked (and tagged) before its first write; raises OutputError when it
        is not a cache."""
        if not self._tagged:
            ensure_cache(self.root)
            self._tagged = True

    def _may_write(self) -> bool:
        """Whether a reader may add index files here: a folder that is not a cache is read, never written."""
        try:
            self._ensure_tagged()
        except (OutputError, OSError):
            return False
        return True

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` (content hashes) that are present and intact."""
        found: dict[str, np.ndarray] = {}
        for shard_keys, vectors in self.iter_cached(keys):
            found.update(zip(shard_keys, vectors))
        return found

    def iter_cached(self, keys: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(keys, vectors [n, dim])`` per intact shard, for the wanted ``keys`` it holds (each once).

        The index says which shards hold them; only those are read (their checksums verified), so a
        lookup costs the keys asked for, not the size of the cache (plus one listing of its folder,
        and the key files of the shards written since the last compaction).
        """
        wanted = set(keys)
        shards, keyed = self._listing()
        if not wanted or not shards:
            return
        located = self._locate(wanted, shards, keyed)
        misplaced = False  # the index named a shard for a key the shard does not hold
        while located:
            by_shard: dict[str, list[str]] = {}
            for key, names in located.items():
                by_shard.setdefault(names[0], []).append(key)
            retry = {}
            for name in sorted(by_shard):
                asked = by_shard[name]
                loaded = self._load_shard(name)
                rows = {}
                if loaded is not None:
                    listed, vectors = loaded
                    position = {key: row for row, key in enumerate(listed)}
                    rows = {key: position[key] for key in asked if key in position}
                    misplaced |= len(rows) < len(asked)
                    if rows:
                        wanted.difference_update(rows)
                        yield list(rows), vectors[list(rows.values())]
                for key in asked:  # damaged or gone: the key's next shard, when another holds it too
                    if key not in rows and len(located[key]) > 1:
                        retry[key] = located[key][1:]
            located = retry
        if misplaced:
            yield from self._scan_and_reindex(wanted)

    def _locate(self, wanted: set[str], shards: set[str], keyed: set[str]) -> dict[str, list[str]]:
        """The shards (present ones, best first) holding each wanted key, from the index."""
        index = read_index(self.dir / INDEX_FILE)
        located: dict[str, list[str]] = {}
        covered = shards.intersection(index.shards) if index is not None else set()
        if covered and len(index.keys):
            query = sorted(key for key in wanted if key.isascii() and len(key) <= KEY_WIDTH)
            ranges = index.locate(key_array(query))
            if ranges is None:  # damaged: this lookup goes by key files (and shards), and rebuilds the index
                index, covered = None, set()
            else:
                for key, start, stop in zip(query, ranges[0].tolist(), ranges[1].tolist()):
                    names = [index.shards[i] for i in index.ids[start:stop].tolist()] if stop > start else []
                    names = [name for name in names if name in covered]
                    if names:
                        located[key] = names
        fresh = {}  # the keys of every shard the compacted index does not list
        wanted_bytes = {key.encode("ascii") for key in wanted if key.isascii()}
        for name in sorted(shards - covered):
            listed = self._keys_of(name, name in keyed)
            if listed is None:
                continue
            fresh[name] = listed
            for key in wanted_bytes.intersection(listed.tolist()):
                located.setdefault(key.decode("ascii"), []).append(name)
        if len(fresh) >= COMPACT_EVERY or (index is None and fresh and (self.dir / INDEX_FILE).exists()):
            self._compact(index, covered, fresh)
        return located

    def _keys_of(self, name: str, has_key_file: bool) -> np.ndarray | None:
        """A shard's keys: from its key file, else from the shard (which then gets its key file);
        None when the shard cannot be read (it is set aside)."""
        if has_key_file:
            listed = read_key_file(self.dir / f"{name}{KEYS_SUFFIX}")
            if listed is not None:
                return listed
        listed = self._shard_keys(name)
        if listed is not None:
            self._write_key_file(name, listed)
        return listed

    def _shard_keys(self, name: str) -> np.ndarray | None:
        """The keys stored in the shard itself; None when it is gone or damaged (then set aside)."""
        path = self.dir / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                return key_array(data["keys"].tolist())  # keys the index cannot hold count as damage too
        except FileNotFoundError:  # set aside by another process meanwhile
            return None
        except Exception:  # noqa: BLE001 - any damage (bad zip, missing member, bad array) sets the shard aside
            self._set_aside(path)
            return None

    def _write_key_file(self, name: str, keys: np.ndarray, required: bool = False) -> None:
        """``<name>.keys`` beside its shard. A reader's is a shortcut for later lookups: a cache it
        may not write is still read, by its shards' keys."""
        if not required and not self._may_write():
            return
        try:
            write_durably(self.dir / f"{name}{KEYS_SUFFIX}", lambda handle: handle.write(key_file_bytes(name, keys)))
        except OSError:
            if required:
                raise

    def _load_shard(self, name: str) -> tuple[list[str], np.ndarray] | None:
        """A shard's keys and vectors, its checksum verified; None when it is damaged (then set aside) or gone."""
        path = self.dir / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                shard_keys, vectors, checksum = data["keys"], data["vectors"], str(data["checksum"])
            if shard_keys.shape[0] != vectors.shape[0] or _checksum(shard_keys, vectors) != checksum:
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - any damage (bad zip, missing member, bad array) sets the shard aside
            self._set_aside(path)
            return None
        return shard_keys.tolist(), vectors

    def _compact(self, index: Index | None, covered: set[str], fresh: dict[str, np.ndarray]) -> None:
        """Write a new compacted index: the old one's entries for shards still there, merged with
        ``fresh`` (name -> keys). A damaged old index is rebuilt from the key files (or shards) instead."""
        if not self._may_write():
            return
        if index is not None and covered and not index.intact():
            for name in sorted(covered):
                listed = self._keys_of(name, has_key_file=True)
                if listed is not None:
                    fresh[name] = listed
            index, covered = None, set()
        names = list(dict.fromkeys(name for name in index.shards if name in covered)) if index is not None else []
        if names:
            old_counts = dict(zip(index.shards, index.counts))
            counts = [old_counts[name] for name in names]
            number = {name: i for i, name in enumerate(names)}
            renumber = np.asarray([number.get(name, len(names)) for name in index.shards], np.int64)
            old_ids = renumber[np.asarray(index.ids, np.int64)]
            kept = old_ids < len(names)
            old_keys, old_ids = np.asarray(index.keys)[kept], old_ids[kept]
        else:
            counts, old_keys, old_ids = [], np.zeros(0, KEY_DTYPE), np.zeros(0, np.int64)
        added = sorted(fresh)
        new_keys = np.concatenate([fresh[name] for name in added]) if added else np.zeros(0, KEY_DTYPE)
        new_ids = np.repeat(np.arange(len(names), len(names) + len(added)), [len(fresh[name]) for name in added])
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_ids = new_keys[order], new_ids[order]
        at = np.searchsorted(old_keys, new_keys, "right")
        write_index(self.dir / INDEX_FILE, names + added, counts + [len(fresh[name]) for name in added],
                     np.insert(old_keys, at, new_keys), np.insert(old_ids, at, new_ids))

    def _scan_and_reindex(self, wanted: set[str]) -> Iterator[tuple[list[str], np.ndarray]]:
        """The way lookups worked before the index, for when it proved wrong: every shard's own keys,
        the wanted keys from the shards holding them; then key files and the index are written anew."""
        truth: dict[str, np.ndarray] = {}
        for name in sorted(self._listing()[0]):
            listed = self._shard_keys(name)
            if listed is None:
                continue
            truth[name] = listed
            written = read_key_file(self.dir / f"{name}{KEYS_SUFFIX}")
            if written is None or not np.array_equal(written, listed):
                self._write_key_file(name, listed)
            hits = wanted.intersection(key.decode("ascii") for key in listed.tolist())
            if hits:
                loaded = self._load_shard(name)
                if loaded is not None:
                    position = {key: row for row, key in enumerate(loaded[0])}
                    found = [key for key in hits if key in position]
                    wanted.difference_update(found)
                    yield found, loaded[1][[position[key] for key in found]]
        self._compact(None, set(), truth)

    def compact(self) -> None:
        """Merge every shard's keys into the compacted index now (lookups do it every ``COMPACT_EVERY`` shards)."""
        shards, keyed = self._listing()
        index = read_index(self.dir / INDEX_FILE)
        covered = shards.intersection(index.shards) if index is not None else set()
        fresh = {}
        for name in sorted(shards - covered):
            listed = self._keys_of(name, name in keyed)
            if listed is not None:
                fresh[name] = listed
        if fresh or index is None or len(covered) < len(index.shards):
            self._compact(index, covered, fresh)

    def write(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one shard atomically (temporary file, fsync, rename), then its key file likewise."""
        key_bytes = key_array(keys)  # refused before anything is written, as the index could not hold them
        self._ensure_tagged()
        self.dir.mkdir(parents=True, exist_ok=True)
        keys_array = np.asarray(list(keys), dtype="U64")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        checksum = _checksum(keys_array, vectors)
        final = self.dir / f"{checksum[:32]}.npz"
        write_durably(final, lambda handle: np.savez(handle, keys=keys_array, vectors=vectors,
                                                      checksum=np.asarray(checksum)))
        self._write_key_file(final.stem, key_bytes, required=True)  # after the shard: a key file never precedes it
        return final

    def info(self) -> dict:
        return _entry_summary(self.dir)


def _entry_summary(entry: Path) -> dict:
    """Shards, vectors and bytes of one cache entry, from its index where it has one (no shard is
    opened then); shards with neither key file nor index entry are counted by reading their keys."""
    shards, keyed, index_bytes, shard_bytes = {}, set(), 0, 0
    try:
        with os.scandir(entry) as listing:
            for item in listing:
                if SHARD_NAME.fullmatch(item.name):
                    shards[item.name[:-4]] = item.stat().st_size
                elif SHARD_KEYS_NAME.fullmatch(item.name) or item.name == INDEX_FILE:
                    index_bytes += item.stat().st_size
                    if item.name != INDEX_FILE:
                        keyed.add(item.name[:-len(KEYS_SUFFIX)])
    except (FileNotFoundError, NotADirectoryError):
        pass
    index = read_index(entry / INDEX_FILE)
    counted = {name: count for name, count in zip(index.shards, index.counts)} if index is not None else {}
    vectors = 0
    for name in shards:
        if name in counted:
            vectors += counted[name]
            continue
        listed = read_key_file(entry / f"{name}{KEYS_SUFFIX}") if name in keyed else None
        if listed is None:
            try:
                with np.load(entry / f"{name}.npz", allow_pickle=False) as data:
                    listed = data["keys"]
            except Exception:  # noqa: BLE001 - a damaged shard holds no usable vector
                continue
        vectors += int(listed.shape[0])
    shard_bytes = sum(shards.values())
    return {"path": str(entry), "shards": len(shards), "vectors": vectors, "bytes": shard_bytes + index_bytes,
            "shard_bytes": shard_bytes, "index_bytes": index_bytes}


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


@dataclass
class Bottlenecks:
    vectors: VectorStore  # content hash -> vector (a Mapping)
    hits: int
    misses: int
    skipped: list[dict] = field(default_factory=list)  # {path, reason}
    corrupt_shards: list[str] = field(default_factory=list)


@dataclass
class LookedUp:
    """What the cache holds of a list of images, and the images left to compute (each content once)."""

    store: VectorStore
    hits: int
    todo: list  # dataset.ImageFile
    corrupt_shards: list[str]
    entry: Path  # the cache entry looked in (module fingerprint and preprocessing)


def look_up(images, cache: BottleneckCache) -> LookedUp:
    """Read the cached vectors of ``images`` into the run's store; the rest are to compute."""
    unique: dict[str, object] = {}
    for image in images:
        unique.setdefault(image.content_hash, image)
    store = VectorStore(cache.dir)
    hits = 0
    for keys, vectors in cache.iter_cached(list(unique)):
        store.add(keys, vectors)
        hits += len(keys)
    todo = [image for key, image in unique.items() if key not in store]
    return LookedUp(store, hits, todo, list(cache.corrupt), cache.dir)


def extract_bottlenecks(images, module, cache: BottleneckCache, batch_size: int = 64, augment=None,
                        backend=None, looked_up: LookedUp | None = None, ahead=None) -> Bottlenecks:
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

    ``backend(todo) -> forward``, when given, chooses what computes the images to compute
    (features/lite.py: TensorFlow or LiteRT); by default ``module.pixel_features``.

    ``looked_up``: what ``look_up(images, cache)`` found earlier in the run; ``ahead``: a
    ``features.ahead.DecodedAhead`` of its images to compute, used when it decodes exactly those
    at the module's size in batches of ``batch_size`` (and closed otherwise).
    """
    looked_up = looked_up or look_up(images, cache)
    store, todo = looked_up.store, looked_up.todo
    result = Bottlenecks(vectors=store, hits=looked_up.hits, misses=len(todo), corrupt_shards=looked_up.corrupt_shards)
    spec = module.info.input_spec
    if ahead is not None and not (augment is None and ahead.matches(todo, spec.height, spec.width, batch_size)):
        ahead.close()
        ahead = None
    try:
        if todo:
            _compute(todo, module, cache, store, result, batch_size, augment, backend, ahead)
    finally:
        if ahead is not None:
            ahead.close()
    return result


def _compute(todo, module, cache, store, result: Bottlenecks, batch_size: int, augment, backend, ahead) -> None:
    spec = module.info.input_spec
    todo_keys = [image.content_hash for image in todo]
    forward = module.pixel_features if backend is None else backend(todo)
    as_tensors = getattr(forward, "takes_tensors", True)  # LiteRT takes NumPy batches
    with _ShardWriter(cache, store) as shards, progress.bar(total=len(todo), desc="bottlenecks", unit="img") as bar:
        batches = ahead if ahead is not None else iter_image_batches(
            [i.path for i in todo], [i.decoder for i in todo], spec.height, spec.width, batch_size, as_tensors=as_tensors
        )
        in_flight = None  # the batch the module is computing; read back after the next one is queued
        for indices, pixels, skipped in batches:
            for index, reason in skipped:
                result.skipped.append({"path": todo[index].path, "reason": reason})
            if pixels is not None and len(indices):
                keys = [todo_keys[index] for index in indices.tolist()]
                if augment is not None:
                    pixels = augment(pixels, keys)
                computing = (keys, forward(pixels))
                if in_flight is not None:
                    shards.add(*in_flight)
                in_flight = computing
            bar.update(len(indices) + len(skipped))
        if in_flight is not None:
            shards.add(*in_flight)


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
        vectors = features.numpy() if hasattr(features, "numpy") else np.asarray(features)
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
        summary = _entry_summary(entry)
        entries.append({"name": entry.name, **{k: summary[k] for k in ("shards", "vectors", "bytes", "index_bytes")}})
    return {"path": str(root), "bytes": sum(e["bytes"] for e in entries), "entries": entries}


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete the cache's bottleneck files and converted modules; returns the number of files removed.

    Only files with the cache's own names in its entry folders go (then the folders, when
    empty); the tag and the module fingerprint records stay, and so does anything else."""
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return 0
    ensure_cache(root)  # an untagged cache with the cache's layout gets its tag
    return sum(remove_entry_files(entry) for entry in cache_entries(root)) + clear_converted(root)
