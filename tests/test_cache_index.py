"""The cache's index (key -> shard): a lookup opens the shards holding the keys asked for, not
every shard; and no kill, concurrent writer or damaged index file loses or corrupts a vector."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrain import safety
from retrain.cli import main
from retrain.features import bottlenecks
from retrain.features.bottlenecks import BottleneckCache, cache_summary, clean_stale_temporaries, clear_cache
from retrain.features.cache_index import INDEX_FILE, read_index, read_key_file, write_index

ROOT = Path(__file__).resolve().parents[1]
DIM = 4
PER_SHARD = 16
FINGERPRINT, PREPROCESSING = "f" * 64, "a" * 12


def key(number: int) -> str:
    return hashlib.sha256(str(number).encode()).hexdigest()


def vector(k: str) -> np.ndarray:
    """The vector every writer stores under key ``k`` (so any copy of it can be checked)."""
    return np.frombuffer(hashlib.sha256(k.encode()).digest()[: 4 * DIM], np.uint8)[:DIM].astype(np.float32)


def cache_at(root: Path) -> BottleneckCache:
    return BottleneckCache(root, FINGERPRINT, PREPROCESSING)


def fill(root: Path, shards: int, start: int = 0) -> dict[str, str]:
    """Write ``shards`` shards of PER_SHARD keys; returns key -> shard name."""
    cache, where = cache_at(root), {}
    for number in range(shards):
        keys = [key(start + number * PER_SHARD + i) for i in range(PER_SHARD)]
        path = cache.write(keys, np.stack([vector(k) for k in keys]))
        where.update(dict.fromkeys(keys, path.stem))
    return where


def check_found(found: dict[str, np.ndarray], keys) -> None:
    assert sorted(found) == sorted(keys)
    for k in keys:
        np.testing.assert_array_equal(found[k], vector(k))


@pytest.fixture
def opened(monkeypatch):
    """The names of the files opened while the test runs (np.load and Path.read_bytes included)."""
    names: list[str] = []
    real = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            names.append(Path(os.fspath(file)).name)
        return real(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(io, "open", spy)
    return names


def test_a_lookup_opens_the_index_and_the_shards_holding_its_keys_only(tmp_path, opened):
    where = fill(tmp_path, 100)  # 1,600 vectors in 100 shards
    keys = list(where)
    check_found(cache_at(tmp_path).lookup(keys[:1]), keys[:1])  # the first lookup compacts the 100 key files
    assert (cache_at(tmp_path).dir / INDEX_FILE).is_file()

    asked = [keys[5 * PER_SHARD], keys[5 * PER_SHARD + 3], keys[80 * PER_SHARD + 7], key(10**9)]  # 2 shards + a miss
    opened.clear()
    check_found(cache_at(tmp_path).lookup(asked), asked[:3])
    assert sorted(opened) == sorted([INDEX_FILE, f"{where[asked[0]]}.npz", f"{where[asked[2]]}.npz"])

    # 10 times more shards: the same lookup opens the same files, plus the key files of the shards
    # written since the last compaction, until a lookup merges them into the index.
    where.update(fill(tmp_path, 900, start=100 * PER_SHARD))
    cache_at(tmp_path).lookup([key(10**9)])  # compacts
    added = fill(tmp_path, 10, start=1000 * PER_SHARD)
    opened.clear()
    check_found(cache_at(tmp_path).lookup(asked), asked[:3])
    new_key_files = {f"{name}.keys" for name in added.values()}
    assert sorted(opened) == sorted([INDEX_FILE, f"{where[asked[0]]}.npz", f"{where[asked[2]]}.npz", *new_key_files])


def test_key_files_since_the_index_are_merged_every_compact_every_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(bottlenecks, "COMPACT_EVERY", 8)
    where = fill(tmp_path, 7)
    cache_at(tmp_path).lookup([key(0)])
    assert not (cache_at(tmp_path).dir / INDEX_FILE).exists()  # 7 shards outside an index: not yet
    where.update(fill(tmp_path, 1, start=7 * PER_SHARD))
    cache_at(tmp_path).lookup([key(0)])
    index = read_index(cache_at(tmp_path).dir / INDEX_FILE)
    assert index is not None and index.intact() and sorted(index.shards) == sorted(set(where.values()))
    assert sorted(np.asarray(index.keys).tolist()) == sorted(k.encode() for k in where)
    assert index.counts == [PER_SHARD] * 8


def test_a_shard_whose_writer_was_killed_before_its_key_file_is_found_and_gets_one(tmp_path, opened):
    where = fill(tmp_path, 3)
    entry = cache_at(tmp_path).dir
    orphan = next(iter(where.values()))
    (entry / f"{orphan}.keys").unlink()  # as a kill between the shard's rename and its key file's leaves it
    (entry / f".tmp-{os.getpid()}-{'0' * 32}.keys").write_bytes(b"half a key file")  # a killed write
    (entry / f".tmp-{os.getpid()}-{'1' * 32}.bin").write_bytes(b"half an index")
    opened.clear()
    check_found(cache_at(tmp_path).lookup(list(where)), list(where))
    assert f"{orphan}.npz" in opened
    listed = read_key_file(entry / f"{orphan}.keys")
    assert sorted(listed.tolist()) == sorted(k.encode() for k, name in where.items() if name == orphan)
    old = time.time() - 7200
    for leftover in entry.glob(".tmp-*"):
        os.utime(leftover, (old, old))
    assert clean_stale_temporaries(tmp_path) == 2 and not list(entry.glob(".tmp-*"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def _damage_index_keys(entry: Path, late) -> None:
    offset = (entry / INDEX_FILE).read_bytes().index(key(PER_SHARD + 2).encode())
    _flip(entry / INDEX_FILE, offset + 10)  # inside one key the test asks for


def _misdirect_index(entry: Path, late) -> None:
    """A well-formed index (digests and all) whose every key names the wrong shard."""
    index = read_index(entry / INDEX_FILE)
    wrong = (np.asarray(index.ids) + 1) % len(index.shards)
    write_index(entry / INDEX_FILE, index.shards, index.counts, np.asarray(index.keys), wrong)


def _swap_key_files(entry: Path, late) -> None:
    (entry / f"{late[0]}.keys").write_bytes((entry / f"{late[1]}.keys").read_bytes())


# Each damage gets the entry folder and the shards written after the index (found by their key files).
DAMAGES = {
    "index deleted": lambda entry, late: (entry / INDEX_FILE).unlink(),
    "index cut short": lambda entry, late: (entry / INDEX_FILE).write_bytes((entry / INDEX_FILE).read_bytes()[:300]),
    "index header flipped": lambda entry, late: _flip(entry / INDEX_FILE, 60),
    "index key flipped": _damage_index_keys,
    "index names the wrong shards": _misdirect_index,
    "index of another folder": lambda entry, late: (entry / INDEX_FILE).write_bytes(
        (entry.parent.parent / "elsewhere" / INDEX_FILE).read_bytes()),
    "key file flipped": lambda entry, late: _flip(entry / f"{late[0]}.keys", 70),
    "key file of another shard": _swap_key_files,
    "key file empty": lambda entry, late: (entry / f"{late[0]}.keys").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_index_costs_time_never_a_vector(damage, tmp_path, monkeypatch, opened):
    monkeypatch.setattr(bottlenecks, "COMPACT_EVERY", 8)
    where = fill(tmp_path / "cache", 12)
    cache_at(tmp_path / "cache").lookup([key(0)])  # compacted: 12 shards in the index
    late = fill(tmp_path / "cache", 3, start=12 * PER_SHARD)  # 3 more, by their key files
    where.update(late)
    entry = cache_at(tmp_path / "cache").dir
    other = tmp_path / "elsewhere"  # a whole index of other shards, for "index of another folder"
    other.mkdir()
    write_index(other / INDEX_FILE, ["0" * 32], [2], np.asarray([b"a" * 64, b"b" * 64]), np.zeros(2))
    DAMAGES[damage](entry, sorted(set(late.values())))

    cache = cache_at(tmp_path / "cache")
    found = cache.lookup(list(where))
    check_found(found, list(where))
    assert cache.corrupt == []  # no shard was taken for damaged

    index = read_index(entry / INDEX_FILE)  # rebuilt where it was wrong; and right again for every shard
    assert index is not None and index.intact()
    for name in set(where.values()) - set(index.shards):
        listed = read_key_file(entry / f"{name}.keys")
        assert sorted(listed.tolist()) == sorted(k.encode() for k, n in where.items() if n == name)
    for position, k in enumerate(np.asarray(index.keys).tolist()):
        assert where[k.decode()] == index.shards[index.ids[position]]
    asked = [key(PER_SHARD + 2)]
    opened.clear()
    check_found(cache_at(tmp_path / "cache").lookup(asked), asked)
    assert sorted(opened) == sorted({INDEX_FILE, f"{where[asked[0]]}.npz"} | {
        f"{name}.keys" for name in set(where.values()) - set(index.shards)})


def test_keys_the_index_cannot_hold_are_refused_before_anything_is_written(tmp_path):
    cache = cache_at(tmp_path)
    for bad in ("k" * 65, "é" * 10):
        with pytest.raises(ValueError):
            cache.write([bad], np.zeros((1, DIM), np.float32))
    assert not cache.dir.exists() or not any(cache.dir.iterdir())


WRITER = f"""
import sys, hashlib
import numpy as np
sys.path.insert(0, sys.argv[1])
from retrain.features import bottlenecks
bottlenecks.COMPACT_EVERY = 4  # compact often: compactions race with writes and with each other
root, first, shards, lookups = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
key = lambda number: hashlib.sha256(str(number).encode()).hexdigest()
vector = lambda k: np.frombuffer(hashlib.sha256(k.encode()).digest()[:{4 * DIM}], np.uint8)[:{DIM}].astype(np.float32)
cache_at = lambda root: bottlenecks.BottleneckCache(root, "{FINGERPRINT}", "{PREPROCESSING}")
cache = cache_at(root)
for number in range(shards):
    keys = [key(first + number * {PER_SHARD} + i) for i in range({PER_SHARD})]
    cache.write(keys, np.stack([vector(k) for k in keys]))
    if lookups:
        found = cache_at(root).lookup(keys[:{PER_SHARD // 2}] + [key(10**9)])
        assert sorted(found) == sorted(keys[:{PER_SHARD // 2}]), "a key just written was not found"
"""


def _writer(root: Path, first: int, shards: int, lookups: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(root), str(first), str(shards),
                             "1" if lookups else "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _consistent(root: Path) -> set[str]:
    """Every file with the cache's names is whole: shards by checksum, key files by digest (and
    equal to their shard's keys), the index by its digests and shard numbers. Returns the keys."""
    entry = cache_at(root).dir
    keys = set()
    for shard in sorted(entry.glob("[!.]*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            shard_keys, vectors, checksum = data["keys"], data["vectors"], str(data["checksum"])
        assert bottlenecks._checksum(shard_keys, vectors) == checksum, shard
        for k, v in zip(shard_keys.tolist(), vectors):
            np.testing.assert_array_equal(v, vector(k))
        keys.update(shard_keys.tolist())
        key_file = shard.with_suffix(".keys")
        if key_file.exists():
            assert read_key_file(key_file).tolist() == [k.encode() for k in shard_keys.tolist()], key_file
    if (entry / INDEX_FILE).exists():
        index = read_index(entry / INDEX_FILE)
        assert index is not None and index.intact()
        assert set(index.shards) <= {p.stem for p in entry.glob("[!.]*.npz")}
    return keys


def test_concurrent_writers_and_compactions_leave_every_vector_findable(tmp_path):
    half = PER_SHARD // 2  # consecutive writers overlap by half a shard: the same key written by two processes
    writers = [_writer(tmp_path, first=w * 150 * PER_SHARD - w * half, shards=150, lookups=w % 2 == 0) for w in range(4)]
    for process in writers:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    keys = _consistent(tmp_path)
    assert len(keys) == 4 * 150 * PER_SHARD - 3 * half
    check_found(cache_at(tmp_path).lookup(sorted(keys)), keys)


def test_sigkill_at_any_instant_leaves_only_whole_files(tmp_path):
    """Writers (and their compactions) killed at random moments, again and again: every file with
    the cache's names is whole, every vector of every shard is found, and after cleaning up the
    temporaries of the dead only the cache's own names are left."""
    rng = np.random.default_rng(0)
    for round_number in range(4):
        process = _writer(tmp_path, first=round_number * 1000 * PER_SHARD, shards=1000, lookups=True)
        time.sleep(float(rng.uniform(0.6, 2.0)))  # start-up (imports) is about half a second of it
        process.send_signal(signal.SIGKILL)
        process.communicate()
        keys = _consistent(tmp_path)
        check_found(cache_at(tmp_path).lookup(sorted(keys)), keys)
    assert len(keys) > 0
    entry = cache_at(tmp_path).dir
    old = time.time() - 7200
    for leftover in entry.glob(".tmp-*"):
        os.utime(leftover, (old, old))
    clean_stale_temporaries(tmp_path)
    assert all(safety.is_entry_file(p) and not p.name.startswith(".") for p in entry.iterdir())


def test_cache_info_counts_vectors_bytes_and_shards_from_the_index(tmp_path, monkeypatch, opened):
    monkeypatch.setattr(bottlenecks, "COMPACT_EVERY", 8)
    where = fill(tmp_path, 10)
    cache_at(tmp_path).lookup([key(0)])  # compacted
    fill(tmp_path, 2, start=10 * PER_SHARD)  # two more, by their key files
    entry = cache_at(tmp_path).dir
    opened.clear()
    summary = cache_summary(tmp_path)
    assert not [name for name in opened if name.endswith(".npz")]  # counted without opening a shard
    (listed,) = summary["entries"]
    shard_bytes = sum(p.stat().st_size for p in entry.glob("*.npz"))
    index_bytes = sum(p.stat().st_size for p in entry.iterdir() if p.suffix in (".keys", ".bin"))
    assert (listed["vectors"], listed["shards"]) == (12 * PER_SHARD, 12)
    assert (listed["bytes"], listed["index_bytes"]) == (shard_bytes + index_bytes, index_bytes)
    assert len(where) == 10 * PER_SHARD
    text = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(tmp_path)], catch_exceptions=False)
    assert f"{12 * PER_SHARD} vectors in 12 shard(s)" in text.stdout
    as_json = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(tmp_path), "--json"], catch_exceptions=False)
    assert json.loads(as_json.stdout)["entries"][0]["index_bytes"] == index_bytes


def test_clearing_removes_the_index_files_and_nothing_else(tmp_path):
    fill(tmp_path, 70)
    cache_at(tmp_path).lookup([key(0)])  # compacted
    entry = cache_at(tmp_path).dir
    mine = [entry / "index.bin.bak", entry / "my.keys", entry / f"{'0' * 31}.keys"]
    for path in mine:
        path.write_bytes(b"mine")
    (tmp_path / safety.CACHEDIR_TAG).unlink()
    assert safety.why_not_cache(tmp_path) is not None  # these names are not the cache's: not cache-shaped
    for path in mine:
        path.unlink()
    assert safety.why_not_cache(tmp_path) is None  # shards, key files and the index are
    safety.ensure_cache(tmp_path)  # tagged again: clearing a tagged cache leaves files of other names
    for path in mine:
        path.write_bytes(b"mine")
    ours = [p for p in entry.iterdir() if p not in mine]
    assert clear_cache(tmp_path) == len(ours) == 70 + 70 + 1
    assert sorted(entry.iterdir()) == sorted(mine) and all(p.read_bytes() == b"mine" for p in mine)
