"""Bottlenecks from an Apache Beam pipeline: ``retrain extract`` (the optional extra ``retrain[beam]``).

The same vectors ``train`` computes, on as many machines as a Beam runner gives, written into the
bottleneck cache so that ``train`` then reads them without decoding an image::

    image paths: a folder scan or a file list (listed here), or globs (matched by the workers)
      -> Reshuffle                  spread the paths over the workers (fusion would keep them on one)
      -> HashFiles                  each file's bytes through Beam's FileSystems, SHA-256 (the cache key);
                                    keys already in the cache stop here, so a rerun computes nothing twice
      -> GroupByKey, FirstPath      identical content is computed once
      -> DecodeFiles                decode + resize through the one preprocessing path (images.decode_to_size)
      -> BatchElements, Embed       the module, loaded once per worker process (Beam's Shared handle) through
                                    load_module, so the trust policy and the op audit run in every worker;
                                    vectors through LoadedModule.pixel_features, as extraction in train;
                                    written by the workers as cache shards of ``shard_size`` vectors

A shard appears whole or not at all: a local (or shared-file-system) cache is written through
``BottleneckCache.write`` (temporary file, fsync, rename); an object-store cache (``gs://...``)
through FileSystems, whose objects appear only when closed. A pipeline killed at any moment
leaves complete shards and nothing else, and the rerun computes only the keys they lack.

The DirectRunner is pinned to Beam's Python runner (the FnApiRunner, which runs
``--direct_running_mode multi_processing`` workers): from Beam 2.68 ``DirectRunner`` may hand
pipelines to the Prism runner, a binary downloaded at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError, ModuleError, RetrainError, first_line


def _import_beam():
    """Import Beam without its one warning on the root logger ("apitools not found", logged when
    the [gcp] extra is absent), which would also give this process a stderr log handler."""
    import logging

    silent = logging.NullHandler()
    logging.getLogger().addHandler(silent)
    try:
        import apache_beam
    finally:
        logging.getLogger().removeHandler(silent)
    return apache_beam


try:
    beam = _import_beam()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
    from apache_beam.utils import shared
except ImportError:  # the optional extra: one line that says how to get it
    raise ConfigError("retrain extract needs Apache Beam: pip install 'retrain[beam]'") from None

DIRECT_RUNNER = "DirectRunner"
NAMESPACE = "retrain.extract"  # of the pipeline's counters
SKIPPED_LISTED = 2000  # skipped files listed in the summary (all are counted), so that it stays small
_RAW = CompressionTypes.UNCOMPRESSED  # image bytes as they are: no decompression by file name


class ExtractError(RetrainError):
    """The Beam pipeline failed."""


@dataclass
class ExtractResult:
    """What a ``retrain extract`` run did. Of the ``images`` read, each was computed, already cached,
    a duplicate or skipped; ``skipped`` also lists files passed over before reading (no image file
    extension, not in a class folder)."""

    cache_dir: str  # the cache entry (module fingerprint + preprocessing) that train reads
    module: dict  # handle, fingerprint, input_spec, feature_dim
    runner: str
    workers: int | None  # DirectRunner worker processes (None: the runner decides)
    images: int  # image files found
    already_cached: int  # their content was in the cache: nothing computed
    computed: int  # vectors computed and written by this run
    duplicates: int  # same content as another file of this run: computed once
    skipped: list[dict] = field(default_factory=list)  # {path, reason}; the first SKIPPED_LISTED
    skipped_total: int = 0
    shards: int = 0  # cache shards written
    processes: int = 0  # processes that computed vectors, each loading the module once (this one, in_memory)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --- what the workers need: plain, picklable values -----------------------------------------------


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
            with FileSystems.open(path, compression_type=_RAW) as handle:
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
            from .bottlenecks import BottleneckCache

            return str(BottleneckCache(self.root, self.fingerprint, self.preprocessing_key).write(keys, vectors))
        return _write_remote_shard(self.entry, keys, vectors)


def _write_remote_shard(entry: str, keys: list[str], vectors: np.ndarray) -> str:
    """A shard as ``BottleneckCache.write`` makes it (same members, checksum and name), created
    through FileSystems: an object store publishes the object only when it is closed."""
    from .bottlenecks import _checksum

    keys_array = np.asarray(list(keys), dtype="U64")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    checksum = _checksum(keys_array, vectors)
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys_array, vectors=vectors, checksum=np.asarray(checksum))
    path = FileSystems.join(entry, f"{checksum[:32]}.npz")
    with FileSystems.create(path, mime_type="application/octet-stream", compression_type=_RAW) as handle:
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
        with FileSystems.open(metadata.path, compression_type=_RAW) as source, open(target, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                out.write(chunk)
    return folder


def load_for_extraction(spec: ModuleSpec):
    """``load_module`` with the launcher's arguments (trust policy, op audit); an object-store
    module is copied to a temporary folder first, which lives as long as the loaded module."""
    from .module import load_module

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


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=_RAW) as handle:
        return handle.read()


def _cannot_read(error: Exception) -> str:
    return f"cannot read: {getattr(error, 'strerror', None) or first_line(error)}"


class MatchedFilter(beam.DoFn):
    """Paths the workers matched (globs): the folder scan's rules, applied here. Under a folder
    ``root`` an image must lie in a class sub-folder; hidden and system files are passed over."""

    def __init__(self, root: str | None):
        self.root = root.rstrip("/") if root else None

    def process(self, path: str):
        from ..data.dataset import _is_ignored
        from ..data.images import IMAGE_EXTENSIONS

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
        from ..data.images import probe_image

        Metrics.counter(NAMESPACE, "images").inc()
        try:
            data = _read(path)
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
        from ..data.images import decode_to_size

        key, path = item
        try:
            data = _read(path)
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
        from .._tf import tf

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


# --- inputs ---------------------------------------------------------------------------------------


@dataclass
class Inputs:
    paths: list[str] | None = None  # listed by the launcher
    patterns: list[str] | None = None  # matched by the workers
    root: str | None = None  # a folder matched by the workers: images lie in its class folders
    skipped: list[dict] = field(default_factory=list)


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_inputs(source: str) -> Inputs:
    """``source`` is a folder of class sub-folders, a glob, or a text file listing images (one path or
    URL a line; relative ones are relative to the list's folder; blank lines and ``#`` lines ignored)."""
    source = str(source)
    if _has_glob(source):
        return Inputs(patterns=[source])
    if FileSystems.get_scheme(source) is None:
        return _list_local(Path(source).expanduser())
    if FileSystems.exists(source):
        return _filtered(_read_list(source, _read(source).decode("utf-8")))
    return Inputs(patterns=[FileSystems.join(source.rstrip("/"), "**")], root=source.rstrip("/"))


def _list_local(path: Path) -> Inputs:
    from ..data.dataset import _is_ignored, _walk_files, list_classes
    from ..data.images import IMAGE_EXTENSIONS

    if not path.exists():
        raise DatasetError(f"images {path} do not exist (expected a folder of class sub-folders, a glob or a file list)")
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return Inputs(paths=[str(path.absolute())])
        return _filtered(_read_list(str(path.absolute()), path.read_text(encoding="utf-8")))
    classes = list_classes(path)
    if not classes:
        raise DatasetError(f"image folder {path} has no class sub-folders: expected {path}/<class>/<images>")
    inputs = Inputs(paths=[])
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=True) and not _is_ignored(entry.name):
            inputs.skipped.append({"path": str(Path(entry.path).absolute()), "reason": "not inside a class folder"})
    found = [file.absolute() for name in classes for file in _walk_files(path / name)]
    return _filtered([str(p) for p in found], inputs)


def _read_list(list_path: str, text: str) -> list[str]:
    base = FileSystems.split(list_path)[0]
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if FileSystems.get_scheme(line) is None and not os.path.isabs(os.path.expanduser(line)):
            line = FileSystems.join(base, line) if FileSystems.get_scheme(base) else str(Path(base) / line)
        paths.append(os.path.expanduser(line) if FileSystems.get_scheme(line) is None else line)
    return paths


def _filtered(paths: list[str], inputs: Inputs | None = None) -> Inputs:
    from ..data.images import IMAGE_EXTENSIONS

    inputs = inputs or Inputs(paths=[])
    for path in paths:
        suffix = os.path.splitext(path)[1]
        if suffix.lower() in IMAGE_EXTENSIONS:
            inputs.paths.append(path)
        else:
            inputs.skipped.append({"path": path, "reason": f"not an image file extension ({suffix or 'none'})"})
    return inputs


# --- pipeline options -----------------------------------------------------------------------------


def pipeline_options(runner: str = DIRECT_RUNNER, workers: int | None = None, beam_args: Sequence[str] = ()):
    """Beam's PipelineOptions for ``runner`` and the extra ``beam_args``, refusing what Beam would
    silently drop (an unknown flag) or die on (a bad value), with one line each."""
    args = [str(a) for a in beam_args]
    for arg in args:
        if arg == "--runner" or arg.startswith("--runner="):
            raise ConfigError("give the runner as retrain's --runner option, before the --")
    direct = runner == DIRECT_RUNNER
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if not direct:
            raise ConfigError(f"--workers is for the DirectRunner; pass {runner}'s own worker options after --")
        if any(a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in args):
            raise ConfigError("--workers sets --direct_num_workers and --direct_running_mode: give one or the other")
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    options = PipelineOptions(args + [f"--runner={runner}"])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # argparse prints its whole usage before exiting
            known = options.get_all_options()
            every = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        message = next((line for line in reversed(stderr.getvalue().splitlines()) if "error:" in line), "bad option")
        raise ConfigError(f"Beam pipeline options: {message.split('error:', 1)[1].strip()}") from None
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise ConfigError(f"unknown Beam pipeline option --{unknown[0]} (see Beam's PipelineOptions for {runner})")
    if direct:
        mode = options.view_as(DirectOptions).direct_running_mode
        if mode == "in_memory" and (options.view_as(DirectOptions).direct_num_workers or 1) > 1:
            raise ConfigError("--direct_num_workers above 1 needs --direct_running_mode multi_processing (or --workers N)")
    return options


def _runner(runner: str, options):
    """The DirectRunner pinned to Beam's Python FnApiRunner (never the downloaded Prism runner)."""
    if runner != DIRECT_RUNNER:
        return None  # Beam creates it from --runner
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # The provision info the DirectRunner gives its FnApiRunner: the workers see the pipeline options.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


# --- the launcher ---------------------------------------------------------------------------------


def extract(images: str | os.PathLike, module: str, *, cache_dir: str | os.PathLike | None = None,
            runner: str = DIRECT_RUNNER, workers: int | None = None, batch_size: int | None = None,
            shard_size: int | None = None, image_size: int | None = None, allow_unversioned: bool = False,
            trust_hosts: Sequence[str] = (), allowed_ops: Sequence[str] = (),
            beam_args: Sequence[str] = ()) -> ExtractResult:
    """Compute the bottlenecks of ``images`` with ``module`` in a Beam pipeline and write them to the
    cache (``cache_dir``, default as for train), where ``retrain train`` finds them.

    Every refusal comes first: options, the cache folder, then the module (trust policy, op audit,
    load and probe), before any image is read."""
    from ..config import TrainConfig, default_cache_dir
    from ..features.audit import check_allowed_ops
    from .bottlenecks import SHARD_SIZE

    started = time.monotonic()
    shard_size = SHARD_SIZE if shard_size is None else shard_size
    for name, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    options = pipeline_options(runner, workers, beam_args)
    for path in (images, module, cache_dir):
        if path is not None:
            _check_file_system(str(path))
    run_folder = _run_folder(runner, options)
    config = TrainConfig(image_size=image_size, allow_unversioned=allow_unversioned, trust_hosts=tuple(trust_hosts),
                         allowed_module_ops=check_allowed_ops(allowed_ops))
    root = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
    local_cache = FileSystems.get_scheme(root) is None
    if local_cache:
        root = str(_prepare_local_cache(root, images, module))
    spec = ModuleSpec(str(module), config.image_size, config.allow_unversioned, config.trust_hosts,
                      config.allowed_module_ops, root if local_cache else None, "")
    loaded = load_for_extraction(spec)  # trust policy and op audit: before any image is read
    spec = replace(spec, fingerprint=loaded.info.fingerprint)
    info = loaded.info
    target = CacheTarget(root, info.fingerprint, info.input_spec.key())
    inputs = list_inputs(str(images))
    if inputs.paths is not None and not inputs.paths:
        raise DatasetError(f"no image files in {images}")
    if local_cache:
        _verify_local_entry(target)
    batch = batch_size or config.batch_for_images(info.input_spec.height, info.input_spec.width)
    handle = shared.Shared()
    handle.acquire(lambda: loaded)  # a worker in this process (in_memory) uses the module loaded here

    with run_folder as folder:
        pipeline = beam.Pipeline(runner=_runner(runner, options), options=options)
        _build(pipeline, inputs, target, spec, handle, (info.input_spec.height, info.input_spec.width), batch,
               shard_size, FileSystems.join(folder, "skipped"))
        subprocess_workers = runner == DIRECT_RUNNER and options.view_as(DirectOptions).direct_running_mode == "multi_processing"
        quiet = _worker_output(subprocess_workers) if runner == DIRECT_RUNNER else contextlib.nullcontext()
        with _progress(target, len(inputs.paths) if inputs.paths is not None else None), quiet as worker_log:
            try:
                result = pipeline.run()
                result.wait_until_finish()
            except RetrainError:
                raise
            except Exception as error:  # noqa: BLE001 - a worker's failure arrives wrapped by the runner
                raise ExtractError(f"the Beam pipeline failed: {_worker_error(error, worker_log)}") from None
        counts = _counters(result)
        listed = _read_skipped(FileSystems.join(folder, "skipped"))
    in_process = runner == DIRECT_RUNNER and not subprocess_workers and counts.get("computed", 0) > 0
    extracted = ExtractResult(
        cache_dir=target.entry, module=info.to_dict(), runner=runner,
        workers=options.view_as(DirectOptions).direct_num_workers if runner == DIRECT_RUNNER else None,
        images=counts.get("images", 0), already_cached=counts.get("already_cached", 0),
        computed=counts.get("computed", 0), duplicates=counts.get("duplicates", 0),
        skipped=(inputs.skipped + listed)[:SKIPPED_LISTED],
        skipped_total=len(inputs.skipped) + counts.get("skipped", 0), shards=counts.get("shards", 0),
        processes=counts.get("module_loads", 0) + int(in_process), seconds=round(time.monotonic() - started, 2))
    if extracted.images == 0 and not extracted.skipped_total:
        raise DatasetError(f"no image files in {images}")
    return extracted


def _build(pipeline, inputs: Inputs, target: CacheTarget, spec: ModuleSpec, handle, size: tuple[int, int],
           batch: int, shard_size: int, skipped_prefix: str) -> None:
    """The steps of the module docstring's picture; ``size`` is the module's (height, width)."""
    skipped = []
    if inputs.paths is not None:
        paths = pipeline | "Paths" >> beam.Create(inputs.paths)
    else:
        from apache_beam.io import fileio

        matched = (pipeline | "Patterns" >> beam.Create(inputs.patterns) | "Match" >> fileio.MatchAll()
                   | "Path" >> beam.Map(lambda metadata: metadata.path)
                   | "Filter" >> beam.ParDo(MatchedFilter(inputs.root)).with_outputs(SKIPPED, main="images"))
        paths, skipped = matched.images, [matched[SKIPPED]]
    hashed = (paths | "Spread" >> beam.Reshuffle()
              | "Hash" >> beam.ParDo(HashFiles(target)).with_outputs(SKIPPED, main="todo"))
    decoded = (hashed.todo
               | "SameContent" >> beam.GroupByKey()
               | "FirstPath" >> beam.ParDo(FirstPath())
               | "Decode" >> beam.ParDo(DecodeFiles(*size)).with_outputs(SKIPPED, main="pixels"))
    _ = (decoded.pixels
         | "Batch" >> beam.BatchElements(min_batch_size=batch, max_batch_size=batch)
         | "Embed" >> beam.ParDo(Embed(spec, target, shard_size, handle)))
    _ = ((*skipped, hashed[SKIPPED], decoded[SKIPPED]) | "Skipped" >> beam.Flatten()
         | "WriteSkipped" >> beam.io.WriteToText(skipped_prefix, file_name_suffix=".jsonl"))


def _run_folder(runner: str, options):
    """Where the workers write the list of skipped files: a temporary folder here for the DirectRunner,
    else under --temp_location (a folder every worker can write, read back here)."""
    if runner == DIRECT_RUNNER:
        return _temporary_folder()
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise ConfigError(f"{runner} needs --temp_location after -- (a folder every worker can write, e.g. gs://BUCKET/tmp): "
                          "the workers list the files they skip there")
    _check_file_system(temp)
    return contextlib.nullcontext(FileSystems.join(temp, f"retrain-extract-{uuid.uuid4().hex[:12]}"))


def _check_file_system(path: str) -> None:
    """A path with a scheme needs Beam's file system for it (gs:// comes with apache-beam[gcp], ...)."""
    scheme = FileSystems.get_scheme(str(path))
    if scheme is None or scheme in ("http", "https"):
        return
    try:
        FileSystems.get_filesystem(str(path))
    except ValueError as error:
        raise ConfigError(f"{path}: {first_line(error)}") from None


@contextlib.contextmanager
def _temporary_folder():
    with tempfile.TemporaryDirectory(prefix="retrain-extract-") as folder:  # made when the run starts
        yield folder


def _read_skipped(prefix: str) -> list[dict]:
    found = []
    for metadata in FileSystems.match([prefix + "*"])[0].metadata_list:
        for line in _read(metadata.path).decode("utf-8").splitlines():
            if line.strip():
                path, reason = json.loads(line)
                found.append({"path": path, "reason": reason})
    return sorted(found, key=lambda item: item["path"])


@contextlib.contextmanager
def _worker_output(subprocess_workers: bool):
    """Quiet DirectRunner workers. Beam's own loggers are silenced while the pipeline runs; worker
    processes write Beam's start-up logs and TensorFlow's notes to the stderr they inherit, which
    is a temporary file while they run (its last lines explain a worker that died), and this
    process's own stderr (the progress bar) stays the terminal."""
    import logging

    beam_logger = logging.getLogger("apache_beam")
    level = beam_logger.level
    beam_logger.setLevel(logging.CRITICAL)  # a failing step is logged with its traceback, then raised: raised is enough
    try:
        if not subprocess_workers:
            yield None
            return
        with _stderr_to_file() as log:
            yield log
    finally:
        beam_logger.setLevel(level)


@contextlib.contextmanager
def _stderr_to_file():
    """fd 2 (inherited by the worker processes) to an anonymous file; sys.stderr to the terminal."""
    log = tempfile.TemporaryFile(prefix="retrain-extract-workers-")
    sys.stderr.flush()
    terminal = os.dup(2)
    original = sys.stderr
    os.dup2(log.fileno(), 2)
    sys.stderr = open(terminal, "w", closefd=False, buffering=1, encoding=getattr(original, "encoding", None) or "utf-8")
    try:
        yield log
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = original
        os.dup2(terminal, 2)
        os.close(terminal)
        log.close()


def _prepare_local_cache(root: str, images, module) -> Path:
    """The local cache folder: a retrain cache (or new), apart from what the run reads; stale
    temporary files of killed runs go (bottlenecks.clean_stale_temporaries)."""
    from ..safety import check_apart, check_cache_folder, ensure_cache
    from .bottlenecks import clean_stale_temporaries

    reads = {}
    if FileSystems.get_scheme(str(images)) is None and not _has_glob(str(images)):
        reads["image folder"] = images
    if FileSystems.get_scheme(str(module)) is None:
        reads["module folder"] = module
    check_apart({"cache folder": root}, reads)
    path = ensure_cache(check_cache_folder(root))
    clean_stale_temporaries(path)
    return path


def _verify_local_entry(target: CacheTarget) -> None:
    """Read every shard of the entry once, checksums included, as train will: a damaged shard is set
    aside now (its keys are then computed again), not found by train after the run."""
    from .bottlenecks import BottleneckCache

    cache = BottleneckCache(target.root, target.fingerprint, target.preprocessing_key)
    keys = [key for path in target.shard_paths() for key in target.keys_of(path)]
    for _ in cache.iter_cached(keys):
        pass


@contextlib.contextmanager
def _progress(target: CacheTarget, total: int | None):
    """A progress bar of the vectors written to the cache entry (polled: the workers may be other
    processes or machines). Images already cached are not counted, as in train."""
    from .. import progress

    seen = set(target.shard_paths())
    stop = threading.Event()

    def poll(bar):
        while not stop.wait(5.0 if target.remote else 0.5):  # an object store is asked less often
            try:
                new = [p for p in target.shard_paths() if p not in seen]
                for path in new:
                    bar.update(len(target.keys_of(path)))
                    seen.add(path)
            except Exception:  # noqa: BLE001 - the bar is a convenience: a failed poll is tried again
                continue

    with progress.bar(total=total, desc="bottlenecks", unit="img") as bar:
        watcher = threading.Thread(target=poll, args=(bar,), name="extract-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    counts: dict[str, int] = {}
    for item in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE)).get("counters", []):
        value = item.committed if item.committed is not None else item.attempted
        counts[item.key.metric.name] = counts.get(item.key.metric.name, 0) + int(value or 0)
    return counts


def _worker_error(error: Exception, worker_log=None) -> str:
    """The user's error inside a runner's wrapped worker traceback: a RetrainError's own line, else
    the last error line the workers wrote, else the runner's first line."""
    texts = [str(error)]
    if worker_log is not None:
        worker_log.seek(0)
        texts.append(worker_log.read().decode("utf-8", "replace"))
    for text in texts:
        for line in reversed(text.splitlines()):
            for name in ("ModuleError", "ConfigError", "DatasetError", "ExtractError", "RetrainError"):
                if f"{name}: " in line:
                    return line.split(f"{name}: ", 1)[1].strip()
    return first_line(error)
