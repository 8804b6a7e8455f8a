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

The package: ``steps.py`` (what the workers run), ``inputs.py`` (what is read), ``options.py``
(Beam's pipeline options checked, the DirectRunner pinned); this file is the launcher (``extract``).
"""

from __future__ import annotations

import contextlib
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

from ...errors import ConfigError, DatasetError, RetrainError, first_line


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
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.utils import shared
except ImportError:  # the optional extra: one line that says how to get it
    raise ConfigError("retrain extract needs Apache Beam: pip install 'retrain[beam]'") from None

from .inputs import Inputs, has_glob, list_inputs  # noqa: E402 - after the guard: they import Beam
from .options import DIRECT_RUNNER, pinned_runner, pipeline_options  # noqa: E402
from .steps import (NAMESPACE, SKIPPED, CacheTarget, DecodeFiles, Embed, FirstPath, HashFiles, MatchedFilter,  # noqa: E402
                    ModuleSpec, load_for_extraction, read_file)

SKIPPED_LISTED = 2000  # skipped files listed in the summary (all are counted), so that it stays small


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
    from ...config import TrainConfig, default_cache_dir
    from ..audit import check_allowed_ops
    from ..bottlenecks import SHARD_SIZE

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
        pipeline = beam.Pipeline(runner=pinned_runner(runner, options), options=options)
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
        for line in read_file(metadata.path).decode("utf-8").splitlines():
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
    from ...safety import check_apart, check_cache_folder, ensure_cache
    from ..bottlenecks import clean_stale_temporaries

    reads = {}
    if FileSystems.get_scheme(str(images)) is None and not has_glob(str(images)):
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
    from ..bottlenecks import BottleneckCache

    cache = BottleneckCache(target.root, target.fingerprint, target.preprocessing_key)
    keys = [key for path in target.shard_paths() for key in target.keys_of(path)]
    for _ in cache.iter_cached(keys):
        pass


@contextlib.contextmanager
def _progress(target: CacheTarget, total: int | None):
    """A progress bar of the vectors written to the cache entry (polled: the workers may be other
    processes or machines). Images already cached are not counted, as in train."""
    from ... import progress

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
