"""The bottleneck cache's index: key -> shard, so that a lookup reads what it asks for.

Beside each shard ``<name>.npz`` its writer puts ``<name>.keys`` (the shard's keys, written after
the shard, atomically); now and then a lookup merges the key files of the shards written since
into ``index.bin`` (sorted keys and their shards, written atomically, read by binary search on a
memory map). Every file is immutable once it has its name and no lock is taken: a reader unions
the compacted index with the key files of the shards it does not list, a shard with neither is
indexed by reading its keys (and then gets its key file), and two writers or compactions at once
each leave complete files.

Damage costs time, never a vector: key files carry a digest of their keys, the index one of its
header and one per block of ``INDEX_BLOCK`` entries, verified for the blocks a lookup reads (where
a key is, or would be); a key file that fails is replaced by its shard's keys, an index that fails
is set aside for this lookup and rebuilt. A key is taken from a shard only after the shard's own
keys and checksum say so, and a shard that lacks a key the index gave it sends the lookup back to
reading every shard's keys (and the index is rebuilt).

The cache (``bottlenecks.BottleneckCache``) decides when to compact (``COMPACT_EVERY``); this
module is the files' format: key files, the compacted index, and the durable write both use.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEY_WIDTH = 64  # keys are SHA-256 hex digests: 64 ASCII characters, stored as such in the index
KEYS_SUFFIX = ".keys"
KEYS_MAGIC = b"retrain-keys-1\n\0"
INDEX_FILE = "index.bin"
INDEX_MAGIC = b"retrain-index-1\n"
INDEX_BLOCK = 32  # index entries per digest: a lookup verifies about 2 KB (one or two blocks) per key it asks for
KEY_DTYPE = f"S{KEY_WIDTH}"


def key_array(keys) -> np.ndarray:
    """Keys as the index stores them (``S64``); a key that is not ASCII of at most 64 characters is refused."""
    encoded = [key.encode("ascii") if isinstance(key, str) else bytes(key) for key in keys]
    if any(len(key) > KEY_WIDTH for key in encoded):
        raise ValueError(f"cache keys have at most {KEY_WIDTH} characters")
    return np.asarray(encoded, dtype=KEY_DTYPE)


def write_durably(final: Path, fill) -> None:
    """Write ``final`` through a temporary sibling: ``fill(handle)``, fsync, rename. A reader (and a
    kill at any instant) sees the whole file or none; a concurrent writer of the same name leaves one
    of the two, and both hold the same content (names derive from it, or it is a complete index)."""
    temporary = final.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}{final.suffix}")
    try:
        with open(temporary, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            temporary.unlink()


def key_file_bytes(name: str, keys: np.ndarray) -> bytes:
    """A key file: magic, SHA-256 of the shard's name and keys (a file copied to another shard's name
    fails it too), the keys."""
    data = np.ascontiguousarray(keys, KEY_DTYPE).tobytes()
    return KEYS_MAGIC + hashlib.sha256(name.encode("ascii") + data).digest() + data


def read_key_file(path: Path) -> np.ndarray | None:
    """A shard's keys from its key file (``S64``); None when it is missing, cut short or damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    start = len(KEYS_MAGIC) + 32
    body = data[start:]
    name = path.name[:-len(KEYS_SUFFIX)].encode("ascii", "replace")
    if (not data.startswith(KEYS_MAGIC) or len(body) % KEY_WIDTH
            or hashlib.sha256(name + body).digest() != data[len(KEYS_MAGIC):start]):
        return None
    return np.frombuffer(body, KEY_DTYPE)


def _block_digests(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """16 bytes of SHA-256 per block of ``INDEX_BLOCK`` entries (keys and shard numbers)."""
    digests = np.zeros((-(-len(keys) // INDEX_BLOCK), 16), np.uint8)
    for block in range(len(digests)):
        part = slice(block * INDEX_BLOCK, (block + 1) * INDEX_BLOCK)
        digests[block] = np.frombuffer(_block_digest(keys[part], ids[part]), np.uint8)
    return digests


def _block_digest(keys: np.ndarray, ids: np.ndarray) -> bytes:
    digest = hashlib.sha256(np.ascontiguousarray(keys).data)
    digest.update(np.ascontiguousarray(ids).data)
    return digest.digest()[:16]


@dataclass
class Index:
    """The compacted index: ``keys`` sorted, ``ids[i]`` the shard (number in ``shards``) of ``keys[i]``,
    ``digests`` one per block of entries; the arrays are memory-mapped."""

    shards: list[str]
    counts: list[int]  # vectors per shard
    keys: np.ndarray
    ids: np.ndarray
    digests: np.ndarray

    def block_intact(self, block: int) -> bool:
        part = slice(block * INDEX_BLOCK, (block + 1) * INDEX_BLOCK)
        return (_block_digest(self.keys[part], self.ids[part]) == self.digests[block].tobytes()
                and bool(np.all(self.ids[part] < len(self.shards))))

    def intact(self) -> bool:
        """Every block verified (reads the whole index: for compaction, not lookups)."""
        return all(self.block_intact(block) for block in range(len(self.digests)))

    def locate(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """For sorted ``query`` keys (``S64``), the range ``[left, right)`` of each in ``keys``; None
        when a block the answer rests on fails its digest (where a key is, or where it would be)."""
        left, right = np.searchsorted(self.keys, query, "left"), np.searchsorted(self.keys, query, "right")
        last = len(self.keys) - 1
        around = np.concatenate([np.clip(left - 1, 0, last), np.clip(left, 0, last), np.clip(right - 1, 0, last)])
        blocks = set((around // INDEX_BLOCK).tolist())
        found = np.flatnonzero(right - left > 1)  # a key in several shards: every block of its entries
        for i in found.tolist():
            blocks.update(range(left[i] // INDEX_BLOCK, (right[i] - 1) // INDEX_BLOCK + 1))
        if not all(self.block_intact(block) for block in sorted(blocks)):
            return None
        return left, right


def _aligned(offset: int) -> int:
    return -(-offset // 64) * 64


def _index_layout(header_length: int, count: int) -> tuple[int, int, int, int]:
    """Offsets of keys, shard numbers and block digests, and the file's size."""
    keys = _aligned(len(INDEX_MAGIC) + 8 + 32 + header_length)
    ids = keys + count * KEY_WIDTH
    digests = ids + count * 4
    return keys, ids, digests, digests + 16 * (-(-count // INDEX_BLOCK))


def read_index(path: Path) -> Index | None:
    """The compacted index at ``path``; None when missing, cut short or damaged in its header (its
    blocks are verified as they are read)."""
    try:
        with open(path, "rb") as handle:  # header and arrays from one open file: a compaction may replace it meanwhile
            fixed = handle.read(len(INDEX_MAGIC) + 8 + 32)
            if len(fixed) != len(INDEX_MAGIC) + 40 or not fixed.startswith(INDEX_MAGIC):
                return None
            length = int.from_bytes(fixed[len(INDEX_MAGIC):len(INDEX_MAGIC) + 8], "little")
            if length > 1 << 30:
                return None
            text = handle.read(length)
            if hashlib.sha256(text).digest() != fixed[len(INDEX_MAGIC) + 8:]:
                return None
            header = json.loads(text.decode("utf-8"))
            count, shards, counts = int(header["vectors"]), list(header["shards"]), [int(c) for c in header["counts"]]
            at_keys, at_ids, at_digests, size = _index_layout(length, count)
            if os.fstat(handle.fileno()).st_size != size or len(shards) != len(counts) or header["block"] != INDEX_BLOCK:
                return None
            if count == 0:
                return Index(shards, counts, np.zeros(0, KEY_DTYPE), np.zeros(0, "<u4"), np.zeros((0, 16), np.uint8))
            def mapped(dtype, offset, shape):  # a plain array on the map: memmap's own slicing is slow in Python
                return np.memmap(handle, dtype, "r", offset, shape).view(np.ndarray)

            return Index(shards, counts, mapped(KEY_DTYPE, at_keys, (count,)), mapped("<u4", at_ids, (count,)),
                          mapped(np.uint8, at_digests, ((size - at_digests) // 16, 16)))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def write_index(path: Path, shards: list[str], counts: list[int], keys: np.ndarray, ids: np.ndarray) -> None:
    keys = np.ascontiguousarray(keys, KEY_DTYPE)
    ids = np.ascontiguousarray(ids, "<u4")
    header = json.dumps({"vectors": len(keys), "block": INDEX_BLOCK, "shards": shards, "counts": counts}).encode("utf-8")
    fixed = INDEX_MAGIC + len(header).to_bytes(8, "little") + hashlib.sha256(header).digest() + header
    at_keys = _index_layout(len(header), len(keys))[0]
    digests = _block_digests(keys, ids)

    def fill(handle):
        handle.write(fixed + b"\0" * (at_keys - len(fixed)))
        handle.write(keys.data)
        handle.write(ids.data)
        handle.write(digests.data)

    write_durably(path, fill)
