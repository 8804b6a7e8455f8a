"""Part 1: the tool's extraction throughput against its ceiling, measured in the same run.

Four measurements on the same images, interleaved over a few rounds (the best round of each
counts, since a busy machine only ever slows a measurement down):

* decode + resize: the tool's own pipeline (``iter_image_batches``) with nothing after it;
* forward: the module's traced function on batches already decoded and in memory;
* forward (LiteRT): the same function converted for LiteRT (features/lite.py), XNNPACK, one
  thread per core, on the same batches;
* extraction: ``extract_bottlenecks`` into an empty cache (decode + resize + forward + cache
  write), with the backend ``train`` chooses (``--extract-backend auto``; the module's
  conversion is cached first, as after a module's first run: it is paid once per module).

On a CPU, decoding and the forward pass share the cores, so a forward's ceiling is
1 / (decode seconds per image + forward seconds per image). On a GPU the CPU decodes while the
GPU computes: TensorFlow's ceiling is the slower of the two rates (LiteRT still shares the CPU).
The ceiling is the better of the two forwards' ceilings.
"""

from __future__ import annotations

import math
import tempfile
import time

from .common import Context, GpuUtilisation, Row, fmt_rate

TARGET = 0.90


def _timed(function) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    count = function()
    return count, time.perf_counter() - wall, time.process_time() - cpu


def run(ctx: Context) -> tuple[dict, list[Row]]:
    from retrain import progress
    from retrain._tf import tf as _tf
    from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
    from retrain.features.lite import ExtractionBackend, LiteForward, write_converted
    from retrain.config import TrainConfig
    from retrain.data.dataset import scan_folder
    from retrain.data.images import iter_image_batches
    from retrain.features.module import load_module

    tf = _tf()
    progress.set_enabled(False)
    count = ctx.sizes["extract_images"]
    # The scan reads every file, so the page cache is warm; identical files are computed once by the tool.
    images = list({i.content_hash: i for i in scan_folder(ctx.extract_dir).images}.values())[:count]
    paths, decoders = [i.path for i in images], [i.decoder for i in images]
    module = load_module(str(ctx.module))
    spec = module.info.input_spec
    batch_size = TrainConfig().batch_for_images(spec.height, spec.width)  # what train uses
    on_gpu = bool(tf.config.list_physical_devices("GPU"))

    forward = module.pixel_features  # the function extraction calls

    first = next(b for _, b, _ in iter_image_batches(paths, decoders, spec.height, spec.width, batch_size) if b is not None)
    with tf.device("/cpu:0"):
        decoded = tf.constant(first)  # where the pipeline leaves a batch: in host memory
    forward(decoded).numpy()  # trace and warm up outside the timings
    calls = math.ceil(len(images) / len(first))
    converted_root = ctx.work / "converted"  # the cache folder holding the converted module
    converted, conversion_seconds = write_converted(module, converted_root)
    lite = LiteForward(converted, spec.height, spec.width, module.info.feature_dim)
    lite(first)  # the interpreter's first invoke plans the delegate: outside the timings

    def decode_only():
        done = 0
        for indices, _, _ in iter_image_batches(paths, decoders, spec.height, spec.width, batch_size, as_tensors=True):
            done += len(indices)
        return done

    def forward_only():
        for _ in range(calls):
            forward(decoded).numpy()
        return calls * len(first)

    def forward_litert():
        for _ in range(calls):
            lite(first)
        return calls * len(first)

    backends = []

    def extract():
        with tempfile.TemporaryDirectory(dir=ctx.work) as folder:
            cache = BottleneckCache(folder, module.info.fingerprint, spec.key())
            backend = ExtractionBackend(module, converted_root, "auto")
            result = extract_bottlenecks(images, module, cache, batch_size, backend=backend)
            backends.append(backend.record)
            if result.misses != len(images) or len(result.vectors) + len(result.skipped) != len(images):
                raise RuntimeError(f"extraction computed {len(result.vectors)} of {len(images)} images")
            return len(images)

    rounds = []
    gpu = GpuUtilisation() if on_gpu else None
    for _ in range(ctx.sizes["rounds"]):
        measured = {}
        for name, function in (("decode", decode_only), ("forward", forward_only), ("forward_litert", forward_litert),
                               ("extract", extract)):
            if name == "extract" and gpu is not None:
                with gpu:
                    n, wall, cpu = _timed(function)
            else:
                n, wall, cpu = _timed(function)
            measured[name] = {"images": n, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                              "rate": n / wall, "cpu_rate": n / cpu if cpu else None}
        rounds.append(measured)

    best = {name: max(r[name]["rate"] for r in rounds) for name in ("decode", "forward", "forward_litert", "extract")}
    faster = "forward_litert" if best["forward_litert"] > best["forward"] else "forward"
    shared = 1.0 / (1.0 / best["decode"] + 1.0 / best["forward_litert"])  # LiteRT shares the CPU with decoding
    if on_gpu:
        ceilings = {"forward": min(best["decode"], best["forward"]), "forward_litert": shared}
    else:
        ceilings = {"forward": 1.0 / (1.0 / best["decode"] + 1.0 / best["forward"]), "forward_litert": shared}
    best_forward = max(ceilings, key=ceilings.get)
    ceiling = ceilings[best_forward]
    formula = ("min(decode rate, forward rate)" if on_gpu and best_forward == "forward"
               else "1 / (decode s/img + forward s/img)") + f", {'LiteRT' if best_forward == 'forward_litert' else 'TensorFlow'} forward"
    ratio = best["extract"] / ceiling
    # The same ratio from CPU time instead of wall time: robust to other processes on the machine.
    cpu_best = {name: max((r[name]["cpu_rate"] or 0) for r in rounds) for name in best}
    cpu_ratio = None
    if not on_gpu and all(cpu_best.values()):
        cpu_ratio = cpu_best["extract"] * (1.0 / cpu_best["decode"] + 1.0 / cpu_best[best_forward])
    details = {
        "images": len(images), "folder": str(ctx.extract_dir), "batch_size": batch_size,
        "device": "gpu" if on_gpu else "cpu", "rounds": rounds, "best_rates": best,
        "ceiling": ceiling, "ceiling_formula": formula, "ceilings": ceilings, "faster_forward": faster,
        "ratio": ratio, "cpu_time_ratio": cpu_ratio, "litert_conversion_seconds": round(conversion_seconds, 3),
        "litert_threads": lite.num_threads, "litert_invoke_batch": lite.invoke_batch,
        "extraction_backends": sorted({record["backend"] for record in backends}), "extraction_backend": backends[-1],
        "gpu_utilisation_during_extraction": gpu.summary() if gpu else None,
    }
    ctx.shared["extraction_ceiling"] = ceiling
    rows = [
        Row("1 extraction", f"decode + resize ({'CPU' if not on_gpu else 'CPU, all cores'})", fmt_rate(best["decode"])),
        Row("1 extraction", f"forward on decoded batches ({'GPU' if on_gpu else 'CPU'}, TensorFlow)", fmt_rate(best["forward"])),
        Row("1 extraction", f"forward on decoded batches (CPU, LiteRT XNNPACK, {lite.num_threads} threads)",
            fmt_rate(best["forward_litert"])),
        Row("1 extraction", "module converted for LiteRT (once per module)", f"{conversion_seconds:.2f} s"),
        Row("1 extraction", f"ceiling = {formula}", fmt_rate(ceiling)),
        Row("1 extraction", f"extract_bottlenecks, {len(images)} images, empty cache, "
            f"{'/'.join(details['extraction_backends'])}", fmt_rate(best["extract"])),
        Row("1 extraction", "extraction / ceiling", f"{100 * ratio:.0f} %", f">= {100 * TARGET:.0f} %", ratio >= TARGET),
    ]
    if cpu_ratio is not None:
        rows.append(Row("1 extraction", "same ratio from CPU seconds (ignores other load)", f"{100 * cpu_ratio:.0f} %"))
    if gpu is not None and gpu.summary():
        rows.append(Row("1 extraction", "GPU utilisation during extraction (mean)", f"{gpu.summary()['mean_percent']:.0f} %"))
    return details, rows
