"""Part 5: peak memory of extraction over a large folder of generated images.

Small JPEGs are generated on the fly in the scratch folder (a few hundred distinct pictures; every
file gets its own comment segment, so every file has its own content hash and is computed: the
tool computes identical content once). A fresh process then does what ``retrain train`` does up
to the bottlenecks (scan and split, load the module, ``extract_bottlenecks`` into an empty cache)
and reports its peak resident memory; for two folder sizes, memory must not grow with the count.

    python -m bench.memory --worker FOLDER --module DIR --cache DIR   (the measured process)
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

from .common import Context, Row, fmt_rate, run_json

DISTINCT = 256  # distinct pictures; files repeat them with different bytes
CLASSES = 10
SIDE = 64
GROWTH_LIMIT = 0.10  # peak memory may grow by at most 10 % from the small folder to the large one


def generate(folder: Path, count: int, seed: int = 0) -> float:
    """Write ``count`` distinct small JPEGs into ``folder/class_NN/``; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(DISTINCT):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        pictures.append(buffer.getvalue())
    for number in range(CLASSES):
        (folder / f"class_{number:02d}").mkdir(parents=True, exist_ok=True)
    for number in range(count):
        text = f"retrain bench image {seed}-{number}".encode()
        comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text  # a JPEG COM segment after SOI
        picture = pictures[number % DISTINCT]
        path = folder / f"class_{number % CLASSES:02d}" / f"image_{number:07d}.jpg"
        path.write_bytes(picture[:2] + comment + picture[2:])
    return time.perf_counter() - started


def worker(folder: str, module: str, cache: str) -> dict:
    from retrain import progress
    from retrain.features.bottlenecks import BottleneckCache, extract_bottlenecks
    from retrain.config import TrainConfig
    from retrain.data.dataset import split_dataset
    from retrain.features.module import load_module

    from .common import peak_rss_mb, proc_status_kb, reset_peak_rss

    progress.set_enabled(False)
    loaded = load_module(module)
    before = (proc_status_kb("VmRSS") or 0) / 1024
    window = reset_peak_rss()  # the peak from here on: scan, split, extraction
    started = time.perf_counter()
    split = split_dataset(folder)
    scanned = time.perf_counter()
    everything = split.train + split.validation + split.test
    cache_obj = BottleneckCache(cache, loaded.info.fingerprint, loaded.info.input_spec.key())
    result = extract_bottlenecks(everything, loaded, cache_obj, TrainConfig().batch_for_images(loaded.info.input_spec.height, loaded.info.input_spec.width))
    finished = time.perf_counter()
    return {"images": len(everything), "computed": result.misses, "skipped": len(result.skipped),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "peak_window_reset": window,
            "rss_after_mb": round((proc_status_kb("VmRSS") or 0) / 1024, 1),
            "scan_seconds": round(scanned - started, 2), "extract_seconds": round(finished - scanned, 2),
            "shards": cache_obj.info()["shards"]}


def run(ctx: Context) -> tuple[dict, list[Row]]:
    sizes = sorted(ctx.sizes["memory_sizes"])
    measured = []
    for number, count in enumerate(sizes):
        folder = ctx.work / f"generated-{count}"
        made = generate(folder, count, seed=number)
        report, wall, _ = run_json(["-m", "bench.memory", "--worker", str(folder), "--module", str(ctx.module),
                                    "--cache", str(ctx.work / f"cache-memory-{count}")], f"extraction of {count} images")
        report["generate_seconds"] = round(made, 1)
        report["wall"] = round(wall, 1)
        measured.append(report)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    rows = [Row("5 memory", f"{m['images']:,} images: peak RSS (scan + extraction; {m['rss_before_mb']:.0f} MB before)",
                f"{m['peak_rss_mb']:,.0f} MB") for m in measured]
    details = {"sizes": measured, "picture": f"{SIDE}x{SIDE} JPEG", "classes": CLASSES}
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"]
        per_image = 1e6 * (large["peak_rss_mb"] - small["peak_rss_mb"]) / max(1, large["images"] - small["images"])
        details.update(growth=growth, bytes_per_extra_image=per_image)
        rows.append(Row("5 memory", f"peak growth {small['images']:,} -> {large['images']:,} images "
                                    f"({per_image:,.0f} bytes per extra image)",
                        f"{100 * growth:+.1f} %", f"<= {100 * GROWTH_LIMIT:.0f} %", growth <= GROWTH_LIMIT))
        rows.append(Row("5 memory", f"extraction of {large['images']:,} small images", fmt_rate(large["images"] / large["extract_seconds"])))
    return details, rows


def main() -> None:
    parser = argparse.ArgumentParser(description="measured process of bench part 5")
    parser.add_argument("--worker", required=True, metavar="FOLDER")
    parser.add_argument("--module", required=True)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args()
    print(json.dumps(worker(args.worker, args.module, args.cache)))


if __name__ == "__main__":
    main()
