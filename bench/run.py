"""The benchmark suite: ``make bench`` or ``python -m bench.run [--quick] [--only PARTS]``.

Measures, in one run on this machine, what caching bottlenecks is for:

1. extraction   the tool's extraction throughput against its ceiling (decode + forward)
2. cold-warm    the same ``retrain train`` cold (empty cache) and warm
3. baseline     ``retrain train`` against an anchor-style baseline that re-runs the module on every
                image in every epoch (TF Hub's former make_image_classifier), same data and split
4. head         head training time on 2k, 20k and 200k cached vectors
5. memory       peak memory of extraction over 5k and 50k generated images
6. tflite       latency per image of each exported TFLite variant
7. few-shot     head accuracy at 5 to 1,000 images per class: the new head, the old one and the
                cross-validated logistic regression (the linear-probe limit) on the same vectors
8. tflite-predict  ``predict`` / ``evaluate`` on a .tflite file without TensorFlow: top-1 agreement
                with the TensorFlow decode path on the validation folder, and ``import tensorflow``
                against a one-image ``retrain predict``
9. head-streaming  the minibatch head streamed from disk on 100k and 1M synthetic vectors (1M: 5.1 GB in the
                scratch folder): peak memory flat, time linear

Prints a table with PASS / MISS against each target and saves everything, with the machine, as
JSON in bench/results/. Data come from ``--data`` (``$RETRAIN_DATA``, default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import ROOT, BenchError, Context, Row, load_snapshot

PARTS = ("extraction", "cold-warm", "baseline", "head", "memory", "tflite", "few-shot", "tflite-predict", "head-streaming")
LABELS = {"extraction": "1 extraction", "cold-warm": "2 cold/warm", "baseline": "3 baseline", "head": "4 head",
          "memory": "5 memory", "tflite": "6 tflite", "few-shot": "7 few-shot", "tflite-predict": "8 tflite-predict",
          "head-streaming": "9 head-streaming"}

FULL = {"extract_images": 2000, "rounds": 4, "limit_per_class": 0, "head_sizes": [2000, 20000, 200000],
        "head_epochs": 10, "memory_sizes": [5000, 50000], "latency_invokes": 100, "stream_sizes": [100000, 1000000],
        "stream_epochs": 2}
QUICK = {"extract_images": 512, "rounds": 2, "limit_per_class": 150, "head_sizes": [2000, 20000, 50000],
         "head_epochs": 3, "memory_sizes": [1000, 5000], "latency_invokes": 30, "stream_sizes": [20000, 100000],
         "stream_epochs": 1}


def _default_data() -> str:
    return os.environ.get("RETRAIN_DATA") or os.environ.get("RETRAIN_SHARED_DATA") or str(ROOT.parent / "shared" / "data")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--data", default=_default_data(), help="shared data kit [$RETRAIN_DATA or ../shared/data]")
    parser.add_argument("--module", help="module folder [DATA/modules/mobilenet_v2_035_224]")
    parser.add_argument("--images", help="labelled image folder for cold-warm, baseline and tflite "
                                         "[DATA/cats_and_dogs_filtered/train]")
    parser.add_argument("--extract-dir", help="labelled image folder for part 1 [same as --images]")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder for the JSON [bench/results]")
    parser.add_argument("--work", help="where the run's scratch folder goes [the system's temporary folder]")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    sizes = parser.add_argument_group("sizes (defaults: full run; --quick picks smaller ones)")
    sizes.add_argument("--extract-images", type=int, help=f"images for part 1 [{FULL['extract_images']}]")
    sizes.add_argument("--rounds", type=int, help=f"interleaved rounds of part 1 [{FULL['rounds']}]")
    sizes.add_argument("--limit-per-class", type=int, help="use only the first N images per class of --images "
                                                           f"(0: all) [{FULL['limit_per_class']}]")
    sizes.add_argument("--head-sizes", type=_int_list, help="vector counts for part 4 [2000,20000,200000]")
    sizes.add_argument("--head-epochs", type=int, help=f"epochs per head training in part 4 [{FULL['head_epochs']}]")
    sizes.add_argument("--memory-sizes", type=_int_list, help="generated image counts for part 5 [5000,50000]")
    sizes.add_argument("--latency-invokes", type=int, help=f"timed invokes per TFLite file [{FULL['latency_invokes']}]")
    sizes.add_argument("--stream-sizes", type=_int_list, help="vector counts for part 9 [100000,1000000]")
    sizes.add_argument("--stream-epochs", type=int, help=f"epochs per head training in part 9 [{FULL['stream_epochs']}]")
    args = parser.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    args.only = [p for p in PARTS if p in only]
    return args


def make_context(args) -> Context:
    data = Path(args.data).expanduser().resolve()
    module = Path(args.module).expanduser().resolve() if args.module else data / "modules" / "mobilenet_v2_035_224"
    images = Path(args.images).expanduser().resolve() if args.images else data / "cats_and_dogs_filtered" / "train"
    extract_dir = Path(args.extract_dir).expanduser().resolve() if args.extract_dir else images
    missing = [str(p) for p in dict.fromkeys((module, images, extract_dir)) if not p.is_dir()]
    if missing:
        raise BenchError(f"data missing: {', '.join(missing)} (pass --data DIR or set RETRAIN_DATA)")
    sizes = dict(QUICK if args.quick else FULL)
    for name in sizes:
        value = getattr(args, name, None)
        if value is not None:
            sizes[name] = value
    parent = Path(args.work).expanduser().resolve() if args.work else None
    if parent is not None and (parent == ROOT or ROOT in parent.parents):
        raise BenchError(f"scratch folder {parent} is inside the repository: choose one outside it")
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    # A new folder every run, so that a "cold" cache is empty.
    work = Path(tempfile.mkdtemp(prefix="retrain-bench-", dir=parent))
    return Context(data=data, module=module, images=images, extract_dir=extract_dir, work=work, quick=args.quick, sizes=sizes)


def _part_function(name: str):
    if name == "extraction":
        from .extraction import run
    elif name == "cold-warm":
        from .tool_runs import cold_warm as run
    elif name == "baseline":
        from .tool_runs import baseline_comparison as run
    elif name == "head":
        from .head_scaling import run
    elif name == "memory":
        from .memory import run
    elif name == "few-shot":
        from .fewshot import run
    elif name == "tflite-predict":
        from .tflite_predict import run
    elif name == "head-streaming":
        from .head_streaming import run
    else:
        from .tool_runs import tflite_latency as run
    return run


def print_table(rows: list[Row], out=sys.stdout) -> None:
    headers = ("part", "measure", "value", "target", "result")
    cells = [headers] + [(r.part, r.measure, r.value if len(r.value) <= 60 else r.value[:57] + "...", r.target, r.result)
                         for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    for number, cell in enumerate(cells):
        print("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) if i == 2 else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(cell, widths))).rstrip(), file=out)
        if number == 0:
            print(line, file=out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ctx = make_context(args)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    # On a GPU, TensorFlow takes all of its memory by default, and the parts run `retrain train`
    # and the baseline in child processes beside this one: every process takes what it uses.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    from .machine import describe, one_line

    started = time.perf_counter()
    machine = describe()
    report = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "load_at_start": load_snapshot(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"module": str(ctx.module), "images": str(ctx.images), "extract_dir": str(ctx.extract_dir)},
        "sizes": ctx.sizes, "parts": {}, "rows": [],
    }
    print(f"machine: {one_line(machine)}", flush=True)
    print(f"load at start: {report['load_at_start']}; scratch: {ctx.work}", flush=True)
    rows: list[Row] = []
    failed = False
    for name in args.only:
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        mark = time.perf_counter()
        try:
            details, part_rows = _part_function(name)(ctx)
        except BenchError as error:
            details, part_rows, failed = {"error": str(error)}, [Row(LABELS[name], "error", str(error), ok=False)], True
        except Exception as error:  # noqa: BLE001 - a part that breaks must not hide the others' results
            text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            details, part_rows, failed = {"error": text}, [Row(LABELS[name], "error", text, ok=False)], True
        details["seconds"] = round(time.perf_counter() - mark, 1)
        details["load_after"] = load_snapshot()
        report["parts"][name] = details
        rows.extend(part_rows)
        for row in part_rows:
            print(f"    {row.measure}: {row.value}" + (f"  (target {row.target}: {row.result})" if row.target else ""), flush=True)
    report["rows"] = [vars(r) | {"result": r.result} for r in rows]
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nretrain benchmarks on {one_line(machine)}")
    print(f"load average at start {report['load_at_start']['loadavg']}, total {report['seconds']:.0f} s\n")
    print_table(rows)
    checked = [r for r in rows if r.ok is not None]
    met = sum(1 for r in checked if r.ok)
    print(f"\n{met} of {len(checked)} targets met")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = results / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {path}")
    if args.keep:
        print(f"scratch kept: {ctx.work}")
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return 1 if failed or (args.strict and met < len(checked)) else 0


if __name__ == "__main__":
    sys.exit(main())
