"""Several accelerators on one machine: ``tf.distribute.MirroredStrategy`` for extraction and
fine-tuning.

With two or more GPUs visible (or ``devices`` asked for), ``train`` loads a second copy of the
module under the strategy's scope, so every variable is mirrored on each device, and runs each
batch as one slice per replica: bottleneck extraction (``ReplicatedExtractor``, the same traced
``pixel_features`` on every replica) and fine-tuning (training/finetune.py, gradients summed over
the replicas by the optimizer). Batches are scaled by the number of replicas, so each device gets
the batch one device would get. The first copy, loaded and probed by ``load_module`` as on one
device, stays the one that is exported: fine-tuning copies its kept weights back into it.

With one device nothing here runs: no strategy, no second copy, the single-device path unchanged.

Why a second copy: functions restored from a SavedModel whose variables are mirrored may only
be called inside ``strategy.run`` (called in the strategy's cross-replica context they fail on a
placeholder), and ``load_module``'s probe, the serving model and the TFLite conversion call them
outside it.

``devices`` above 1 takes that many GPUs; on a machine with no GPU it takes logical CPU devices
when the process has made them (``tf.config.set_logical_device_configuration`` before TensorFlow
starts): that is how the tests run two replicas on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._tf import keras_registrations
from ._tf import tf as _tf
from .errors import ConfigError


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Replicas:
    strategy: object  # tf.distribute.MirroredStrategy
    devices: tuple[str, ...]
    module: object = None  # the mirrored copy of the module (``load``), a LoadedModule
    extractor: object = None  # ReplicatedExtractor over it: what extraction calls

    @property
    def count(self) -> int:
        return len(self.devices)

    def bounds(self, n: int) -> list[int]:
        """Row bounds of each replica's slice of an ``n``-row batch (``n`` at least the number of
        replicas): sizes differ by one at most, and none is empty."""
        return [i * n // self.count for i in range(self.count + 1)]

    def split(self, *batches):
        """Per-replica slices of batch-major arrays or tensors, each placed on its replica's device,
        and each slice's first row in the whole batch: ``(*per_replica_batches, per_replica_offsets)``.

        A batch of fewer rows than replicas (a last batch) is padded with copies of its last row,
        one row per replica: an empty slice is no option, as a module's ops may fail on a batch of
        none (a convolution did here). Rows from ``len(batch)`` on are padding, for the caller to drop
        (outputs) or weigh 0 (losses)."""
        tf = _tf()
        host = [np.asarray(batch) for batch in batches]  # host tensors (tf.data's) convert without a copy
        n = len(host[0])
        if n < self.count:
            host = [np.concatenate([batch, np.repeat(batch[-1:], self.count - n, axis=0)]) for batch in host]
        bounds = self.bounds(max(n, self.count))
        devices = self.strategy.extended.worker_devices

        def value_fn(context):
            replica = context.replica_id_in_sync_group
            start, stop = bounds[replica], bounds[replica + 1]
            with tf.device(devices[replica]):  # sliced on the host, each slice copied to its own device only
                parts = tuple(tf.identity(batch[start:stop]) for batch in host)
                return parts + (tf.constant(start, tf.int64),)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def local(self, value) -> tuple:
        return self.strategy.experimental_local_results(value)

    def load(self, module) -> None:
        """Load a copy of ``module`` (a LoadedModule, already audited and probed) under the
        strategy's scope, its variables mirrored on every replica's device: ``self.module``, and
        ``self.extractor`` over it."""
        from .features.module import LoadedModule, _call_and_spec

        tf = _tf()
        spec = module.info.input_spec
        with self.strategy.scope():
            keras_registrations()
            obj = tf.saved_model.load(module.info.path)
        call, _ = _call_and_spec(obj)
        traced = tf.function(call, input_signature=[tf.TensorSpec([None, spec.height, spec.width, 3], tf.float32)],
                             autograph=False)
        self.module = LoadedModule(module.info, obj, traced)
        self.extractor = ReplicatedExtractor(self, self.module)

    def record(self) -> dict:
        return {"replicas": self.count, "strategy": "MirroredStrategy", "devices": list(self.devices)}

    def backend(self, requested: str) -> "ReplicatedBackend":
        return ReplicatedBackend(self, requested)


def choose_devices(requested: int | None, extract_backend: str = "auto") -> Replicas | None:
    """The replicas to run on, or None for one device (no strategy).

    ``None``: every visible GPU when there are two or more, else one device. ``1``: one device.
    ``N`` > 1: the first N GPUs; with no GPU, N logical CPU devices if the process made them.
    On several devices extraction runs TensorFlow on them: ``extract_backend`` "litert" (one
    CPU process) is refused rather than silently not used."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--devices must be at least 1, got {requested}")
    if requested == 1:
        return None
    tf = _tf()
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if requested is None:
        if len(gpus) < 2:
            return None
        names = gpus
    elif len(gpus) >= requested:
        names = gpus[:requested]
    else:
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        if gpus or len(cpus) < requested:
            raise ConfigError(
                f"--devices {requested}: only {len(gpus)} GPU(s) visible here (see CUDA_VISIBLE_DEVICES and "
                f"nvidia-smi); pass --devices {max(len(gpus), 1)} or leave it out to use every GPU")
        names = cpus[:requested]
    if extract_backend == "litert":
        raise ConfigError(f"--extract-backend litert runs on the CPU, not on the {len(names)} devices this run uses: "
                          "pass --devices 1 for LiteRT, or --extract-backend tensorflow")
    return Replicas(tf.distribute.MirroredStrategy(names), tuple(names))


class ReplicatedExtractor:
    """Stands in for a LoadedModule in ``extract_bottlenecks``: ``info`` and ``pixel_features``,
    a uint8 batch split over the replicas, each slice through the mirrored module's own traced
    ``pixel_features``, the vectors gathered back in the batch's order on the host."""

    def __init__(self, replicas: Replicas, mirrored):
        tf = _tf()
        self.info = mirrored.info
        self.replicas = replicas
        strategy = replicas.strategy

        # A lambda, not the traced function itself: strategy.run would call a tf.function with
        # an input signature on the per-replica values whole, not on each replica's slice.
        @tf.function(reduce_retracing=True, autograph=False)
        def features(pixels, n):
            outputs = strategy.run(lambda part: mirrored.pixel_features(part), args=(pixels,))
            with tf.device("/cpu:0"):
                return tf.concat(strategy.experimental_local_results(outputs), axis=0)[:n]  # padding dropped

        self._features = features

    def pixel_features(self, pixels):
        parts, _ = self.replicas.split(pixels)
        return self._features(parts, _tf().constant(len(pixels), _tf().int32))


class ReplicatedBackend:
    """The extraction backend (``extract_bottlenecks(..., backend=)``, as features/lite.py's) of a
    run on several devices: TensorFlow on every replica, and the record that says so."""

    def __init__(self, replicas: Replicas, requested: str):
        self.replicas = replicas
        self.record = {"backend": "tensorflow", "requested": requested,
                       "reason": f"{replicas.count} devices under MirroredStrategy"}
        self.warnings: list[str] = []

    def __call__(self, todo):
        return self.replicas.extractor.pixel_features


def copy_trained_weights(source, target) -> None:
    """Put the values of ``source``'s trainable variables (the mirrored copy, after fine-tuning)
    into ``target``'s (the module that is exported). Both are loads of the same files, so their
    lists match name for name; anything else is a bug, and stops here."""
    sources = list(getattr(source.obj, "trainable_variables", None) or [])
    targets = list(getattr(target.obj, "trainable_variables", None) or [])
    if [v.name for v in sources] != [v.name for v in targets] or \
            [tuple(v.shape) for v in sources] != [tuple(v.shape) for v in targets]:
        raise RuntimeError("the mirrored and the exported copy of the module list different variables")
    for from_variable, to_variable in zip(sources, targets):
        to_variable.assign(from_variable.numpy())


__all__ = ["Replicas", "ReplicatedExtractor", "choose_devices", "copy_trained_weights"]
