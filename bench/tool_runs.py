"""Parts 2, 3 and 6: ``retrain train`` as a user runs it (a fresh process, ``--json``).

2. cold-warm: the same command with an empty cache, then again with the cache it filled.
3. baseline:  the cold command against the anchor-style baseline (bench/baseline.py) on the
              same images, module and split; both write a SavedModel and a float32 TFLite file,
              so ``retrain train`` runs with ``--quantize none`` there; and once more with the
              defaults (the int8 file on), what users run, in an empty cache of its own.
6. tflite:    every TFLite variant exported, and its latency per image with the LiteRT interpreter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .common import (
    BenchError,
    Context,
    Row,
    fmt_rate,
    fmt_s,
    python_env,
    retrain_train,
    run_json,
)

SAME_OUTPUTS = ("--quantize", "none")  # SavedModel + float32 TFLite: what the baseline writes
BOTTLENECK_SPEEDUP_TARGET = 100.0
END_TO_END_TARGET = 4.0


def _images(ctx: Context) -> Path:
    """The labelled folder, or links to its first N images per class (``--limit-per-class``)."""
    limit = ctx.sizes.get("limit_per_class") or 0
    if not limit:
        return ctx.images
    if "limited_images" not in ctx.shared:
        from retrain.data.dataset import list_classes

        folder = ctx.work / f"images-{limit}-per-class"
        for name in list_classes(ctx.images):
            (folder / name).mkdir(parents=True, exist_ok=True)
            files = sorted(p for p in (ctx.images / name).iterdir() if p.is_file() and not p.name.startswith("."))
            for path in files[:limit]:
                (folder / name / path.name).symlink_to(path)
        ctx.shared["limited_images"] = folder
    return ctx.shared["limited_images"]


def _cold(ctx: Context) -> dict:
    """``retrain train --quantize none`` with an empty cache; run once and shared by parts 2 and 3."""
    if "cold" not in ctx.shared:
        cache = ctx.work / "cache"
        result, wall, cpu = retrain_train(_images(ctx), ctx.module, ctx.work / "out-cold", cache, *SAME_OUTPUTS)
        ctx.shared["cold"] = {"result": result, "wall": wall, "cpu": cpu, "cache": cache}
    return ctx.shared["cold"]


def _phases(result: dict, wall: float) -> dict:
    timings = dict(result["timings"])
    timings["start_up"] = max(0.0, wall - timings["total"])  # interpreter, imports, CLI: before the first phase
    timings["wall"] = wall
    return {k: round(v, 3) for k, v in timings.items()}


def cold_warm(ctx: Context) -> tuple[dict, list[Row]]:
    cold = _cold(ctx)
    warm_result, warm_wall, warm_cpu = retrain_train(_images(ctx), ctx.module, ctx.work / "out-warm", cold["cache"], *SAME_OUTPUTS)
    if warm_result["cache"]["misses"]:
        raise BenchError(f"warm run computed {warm_result['cache']['misses']} bottlenecks: the cache did not hold")
    c, w = _phases(cold["result"], cold["wall"]), _phases(warm_result, warm_wall)
    computed = cold["result"]["cache"]["misses"]
    speedup = c["bottlenecks"] / max(w["bottlenecks"], 1e-6)
    fixed = (w["start_up"] + w["module"] + w["export"]) / w["wall"]
    images = (w["scan"] + w["bottlenecks"]) / w["wall"]
    details = {"command": "retrain train IMAGES --module M --output O --cache-dir C --json " + " ".join(SAME_OUTPUTS),
               "images": str(_images(ctx)), "cold": c, "warm": w, "cold_cpu_seconds": round(cold["cpu"], 2),
               "warm_cpu_seconds": round(warm_cpu, 2), "cold_cache": cold["result"]["cache"],
               "warm_cache": warm_result["cache"], "bottleneck_speedup": speedup}
    rows = [
        Row("2 cold/warm", "cold: whole command", fmt_s(c["wall"])),
        Row("2 cold/warm", "warm: whole command", fmt_s(w["wall"])),
        Row("2 cold/warm", f"cold: bottleneck phase ({computed} computed)", fmt_s(c["bottlenecks"])),
        Row("2 cold/warm", f"warm: bottleneck phase ({warm_result['cache']['hits']} from cache)", f"{w['bottlenecks']:.3f} s"),
        Row("2 cold/warm", "bottleneck phase cold / warm", f"{speedup:,.0f}x", f">= {BOTTLENECK_SPEEDUP_TARGET:.0f}x",
            speedup >= BOTTLENECK_SPEEDUP_TARGET),
        Row("2 cold/warm", "warm: start-up + module load + export, share of whole", f"{100 * fixed:.0f} %", "> 50 %", fixed > 0.5),
        Row("2 cold/warm", "warm: scan + bottlenecks (the images), share of whole", f"{100 * images:.1f} %", "< 10 %", images < 0.10),
    ]
    if computed and c["bottlenecks"]:
        rate = computed / c["bottlenecks"]
        ceiling = ctx.shared.get("extraction_ceiling")
        note = f" = {100 * rate / ceiling:.0f} % of part 1's ceiling" if ceiling else ""
        rows.append(Row("2 cold/warm", f"cold bottleneck phase throughput{note}", fmt_rate(rate)))
    return details, rows


def _link_split(ctx: Context, folder: Path):
    """retrain's own split of the images, as train/validation/test folders of links."""
    from retrain.config import TrainConfig
    from retrain.data.dataset import split_dataset

    defaults = TrainConfig()
    split = split_dataset(_images(ctx), defaults.validation_percent, defaults.test_percent)
    for part in ("train", "validation", "test"):
        for number, image in enumerate(getattr(split, part)):
            target = folder / part / split.classes[image.label] / f"{number:06d}_{image.relpath.replace('/', '__')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.realpath(image.path))
    return split


def baseline_comparison(ctx: Context) -> tuple[dict, list[Row]]:
    cold = _cold(ctx)
    folder = ctx.work / "baseline-split"
    split = _link_split(ctx, folder)
    size = cold["result"]["module"]["input_spec"]["height"]
    baseline, wall, cpu = run_json(
        ["-m", "bench.baseline", "--split", str(folder), "--module", str(ctx.module), "--image-size", str(size),
         "--output", str(ctx.work / "out-baseline")],
        "baseline", env=python_env(TF_USE_LEGACY_KERAS="1"))
    baseline_command = wall - baseline["timings"]["test_evaluation"]  # its test evaluation is ours, not its
    tool = _phases(cold["result"], cold["wall"])
    speedup = baseline_command / tool["wall"]
    tool_accuracy = cold["result"]["metrics"]["test"]["accuracy"]
    n_test = cold["result"]["metrics"]["test"]["n_images"]
    base_accuracy = baseline["test_accuracy"]
    one_image = 1.0 / max(n_test, 1)
    accuracy_ok = tool_accuracy >= base_accuracy - one_image - 1e-9
    image_work_tool = tool["bottlenecks"] + tool["train"]
    image_work_base = baseline["timings"]["fit"]
    details = {"images": str(_images(ctx)), "split": split.counts(), "baseline": baseline,
               "baseline_wall": round(wall, 3), "baseline_command_seconds": round(baseline_command, 3),
               "baseline_cpu_seconds": round(cpu, 2), "retrain": tool, "retrain_cpu_seconds": round(cold["cpu"], 2),
               "retrain_test_accuracy": tool_accuracy, "retrain_head": cold["result"].get("head"),
               "speedup": speedup, "n_test": n_test}
    rows = [
        Row("3 baseline", "baseline: frozen hub.KerasLayer, 5 epochs, SavedModel + TFLite", fmt_s(baseline_command)),
        Row("3 baseline", "retrain train --quantize none, empty cache", fmt_s(tool["wall"])),
        Row("3 baseline", "speed-up end to end (baseline / retrain)", f"{speedup:.1f}x", f">= {END_TO_END_TARGET:.0f}x",
            speedup >= END_TO_END_TARGET),
        Row("3 baseline", f"test accuracy retrain / baseline ({n_test} images)", f"{tool_accuracy:.3f} / {base_accuracy:.3f}",
            ">= baseline - 1 image", accuracy_ok),
        Row("3 baseline", "image work: baseline fit / retrain (bottlenecks + head)",
            f"{image_work_base:.1f} / {image_work_tool:.1f} s = {image_work_base / max(image_work_tool, 1e-6):.1f}x"),
        Row("3 baseline", "fixed work: baseline (start-up, export) / retrain (start-up, module, export)",
            f"{baseline_command - image_work_base:.1f} / {tool['wall'] - image_work_tool:.1f} s"),
    ]
    # What users run: the defaults (the int8 file on, checked), in its own empty cache.
    defaults_result, defaults_wall, defaults_cpu = retrain_train(_images(ctx), ctx.module, ctx.work / "out-cold-defaults",
                                                                 ctx.work / "cache-defaults")
    defaults = _phases(defaults_result, defaults_wall)
    details["retrain_defaults"] = defaults
    details["retrain_defaults_cpu_seconds"] = round(defaults_cpu, 2)
    details["retrain_defaults_tflite"] = defaults_result["metrics"].get("tflite")
    defaults_speedup = baseline_command / defaults["wall"]
    rows += [
        Row("3 baseline", "retrain train with the defaults (int8 on), empty cache", fmt_s(defaults["wall"])),
        Row("3 baseline", "speed-up end to end with the defaults (baseline / retrain)", f"{defaults_speedup:.1f}x",
            f">= {END_TO_END_TARGET:.0f}x", defaults_speedup >= END_TO_END_TARGET),
        Row("3 baseline", "defaults: phases (module / bottlenecks / head / export)",
            " / ".join(f"{defaults.get(k, 0):.1f}" for k in ("module", "bottlenecks", "train", "export")) + " s"),
    ]
    crossover = _crossover(baseline_command - image_work_base, image_work_base, tool["wall"] - image_work_tool,
                           image_work_tool, sum(split.counts().values()))
    details["crossover_images"] = crossover
    if speedup < END_TO_END_TARGET:
        rows.append(Row("3 baseline", f"images where end to end reaches {END_TO_END_TARGET:.0f}x "
                                      "(extrapolated from this run's fixed and per-image costs)",
                        f"~{crossover:,.0f}" if crossover else "none: image work ratio is below it"))
    return details, rows


def _crossover(baseline_fixed, baseline_images, tool_fixed, tool_images, count) -> float | None:
    """The image count at which baseline / retrain reaches the target, if costs stay linear in images."""
    per_baseline, per_tool = baseline_images / count, tool_images / count
    if per_baseline <= END_TO_END_TARGET * per_tool:
        return None
    return max(float(count), (END_TO_END_TARGET * tool_fixed - baseline_fixed) / (per_baseline - END_TO_END_TARGET * per_tool))


def _interpreter(path: Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from retrain._tf import tf as _tf

        Interpreter = _tf().lite.Interpreter
    from retrain._tf import quiet_stderr

    with quiet_stderr():
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter


def _latency_ms(path: Path, pixels, threads: int, invokes: int) -> dict:
    import numpy as np

    interpreter = _interpreter(path, threads)
    detail = interpreter.get_input_details()[0]
    images = [np.asarray(p, detail["dtype"])[None] for p in pixels]
    for image in images[:5]:  # warm-up: delegate preparation, first allocations
        interpreter.set_tensor(detail["index"], image)
        interpreter.invoke()
    times = []
    for number in range(invokes):
        interpreter.set_tensor(detail["index"], images[number % len(images)])
        started = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - started)
    times.sort()
    return {"median_ms": round(1000 * times[len(times) // 2], 3), "mean_ms": round(1000 * sum(times) / len(times), 3),
            "threads": threads, "invokes": invokes}


def tflite_latency(ctx: Context) -> tuple[dict, list[Row]]:
    from retrain.data.dataset import split_dataset
    from retrain.data.images import load_image

    cache = ctx.shared.get("cold", {}).get("cache", ctx.work / "cache")
    output = ctx.work / "out-tflite"
    result, wall, _ = retrain_train(_images(ctx), ctx.module, output, cache,
                                    "--quantize", "int8", "--quantize", "float16", "--quantize", "dynamic")
    spec = result["module"]["input_spec"]
    test = split_dataset(_images(ctx)).test[:16]
    pixels = [load_image(i.path, spec["height"], spec["width"]) for i in test]
    invokes = ctx.sizes["latency_invokes"]
    threads = os.cpu_count() or 1
    details = {"train_wall": round(wall, 2), "export_seconds": result["timings"]["export"], "variants": {}}
    rows = []
    for name, figures in result["metrics"]["tflite"].items():
        path = output / figures["file"]
        one = _latency_ms(path, pixels, 1, invokes)
        many = _latency_ms(path, pixels, threads, invokes)
        details["variants"][name] = {"retrain_check": figures, "latency_1_thread": one, f"latency_{threads}_threads": many}
        rows.append(Row("6 tflite", f"{name:<8} {figures['file']} ({figures['size_bytes'] / 1e6:.2f} MB, "
                                    f"accuracy {figures['accuracy']:.3f}): ms/image, 1 / {threads} threads",
                        f"{one['median_ms']:.2f} / {many['median_ms']:.2f} ms"))
    return details, rows
