"""Part 1: the tool's extraction throughput against its ceiling, measured in the same run.

Three measurements on the same images, interleaved over a few rounds (the best round of each
counts, since a busy machine only ever slows a measurement down):

* decode + resize: the tool's own pipeline (``iter_image_batches``) with nothing after it;
* forward: the module's traced function on batches already decoded and in memory;
* extraction: ``extract_bottlenecks`` into an empty cache (decode + resize + forward + cache write).

On a CPU, decoding and the forward pass share the cores, so the ceiling is
1 / (decode seconds per image + forward seconds per image). On a GPU the CPU decodes while the
GPU computes: the ceiling is the slower of the two rates.
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

    def decode_only():
        done = 0
        for indices, _, _ in iter_image_batches(paths, decoders, spec.height, spec.width, batch_size, as_tensors=True):
            done += len(indices)
        return done

    def forward_only():
        for _ in range(calls):
            forward(decoded).numpy()
        return calls * len(first)

    def extract():
        with tempfile.TemporaryDirectory(dir=ctx.work) as folder:
            cache = BottleneckCache(folder, module.info.fingerprint, spec.key())
            result = extract_bottlenecks(images, module, cache, batch_size)
            if result.misses != len(images) or len(result.vectors) + len(result.skipped) != len(images):
                raise RuntimeError(f"extraction computed {len(result.vectors)} of {len(images)} images")
            return len(images)

    rounds = []
    gpu = GpuUtilisation() if on_gpu else None
    for _ in range(ctx.sizes["rounds"]):
        measured = {}
        for name, function in (("decode", decode_only), ("forward", forward_only), ("extract", extract)):
            if name == "extract" and gpu is not None:
                with gpu:
                    n, wall, cpu = _timed(function)
            else:
                n, wall, cpu = _timed(function)
            measured[name] = {"images": n, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                              "rate": n / wall, "cpu_rate": n / cpu if cpu else None}
        rounds.append(measured)

    best = {name: max(r[name]["rate"] for r in rounds) for name in ("decode", "forward", "extract")}
    if on_gpu:
        ceiling, formula = min(best["decode"], best["forward"]), "min(decode rate, forward rate)"
    else:
        ceiling, formula = 1.0 / (1.0 / best["decode"] + 1.0 / best["forward"]), "1 / (decode s/img + forward s/img)"
    ratio = best["extract"] / ceiling
    # The same ratio from CPU time instead of wall time: robust to other processes on the machine.
    cpu_best = {name: max((r[name]["cpu_rate"] or 0) for r in rounds) for name in best}
    cpu_ratio = None
    if not on_gpu and all(cpu_best.values()):
        cpu_ratio = cpu_best["extract"] * (1.0 / cpu_best["decode"] + 1.0 / cpu_best["forward"])
    details = {
        "images": len(images), "folder": str(ctx.extract_dir), "batch_size": batch_size,
        "device": "gpu" if on_gpu else "cpu", "rounds": rounds, "best_rates": best,
        "ceiling": ceiling, "ceiling_formula": formula, "ratio": ratio, "cpu_time_ratio": cpu_ratio,
        "gpu_utilisation_during_extraction": gpu.summary() if gpu else None,
    }
    ctx.shared["extraction_ceiling"] = ceiling
    rows = [
        Row("1 extraction", f"decode + resize ({'CPU' if not on_gpu else 'CPU, all cores'})", fmt_rate(best["decode"])),
        Row("1 extraction", f"forward on decoded batches ({'GPU' if on_gpu else 'CPU'})", fmt_rate(best["forward"])),
        Row("1 extraction", f"ceiling = {formula}", fmt_rate(ceiling)),
        Row("1 extraction", f"extract_bottlenecks, {len(images)} images, empty cache", fmt_rate(best["extract"])),
        Row("1 extraction", "extraction / ceiling", f"{100 * ratio:.0f} %", f">= {100 * TARGET:.0f} %", ratio >= TARGET),
    ]
    if cpu_ratio is not None:
        rows.append(Row("1 extraction", "same ratio from CPU seconds (ignores other load)", f"{100 * cpu_ratio:.0f} %"))
    if gpu is not None and gpu.summary():
        rows.append(Row("1 extraction", "GPU utilisation during extraction (mean)", f"{gpu.summary()['mean_percent']:.0f} %"))
    return details, rows
