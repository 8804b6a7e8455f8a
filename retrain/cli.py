"""Command line: parse, call one library function, print. No TensorFlow import until a command runs."""

from __future__ import annotations

import json

import click

from . import __version__, progress
from .config import AUGMENT_COPIES, CLASS_WEIGHTS, EXTRACT_BACKENDS, HEADS, TrainConfig
from .cli_text import (accuracy, balance_line, fine_tune_line, head_line, label_errors_line, skipped_note,
                       tflite_table)
from .errors import RetrainError
from .features.lite import AUTO_MIN_IMAGES
from .serving.tflite import TFLITE_FORMATS

# Both choice lists come from the one format table (export.TFLITE_FORMATS).
QUANTIZE_CHOICES = tuple(name for name in TFLITE_FORMATS if name != "float32") + ("none",)
EXPORT_FORMATS = {fmt.export_name: name for name, fmt in TFLITE_FORMATS.items()}
DEFAULTS = TrainConfig()


class RetrainGroup(click.Group):
    """Turns library errors into one ``Error: ...`` line (exit 1) and Ctrl-C into one line (exit 130)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RetrainError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing was written to the output folder.", err=True)
            ctx.exit(130)


def _output_options(function):
    function = click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")(function)
    function = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout and nothing else there.")(function)
    return function


def _setup(quiet: bool, as_json: bool) -> None:
    progress.set_enabled(not (quiet or as_json))


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _loud(warnings) -> None:
    """Warnings go to stderr in every mode: a quantized file that lost accuracy must not pass unseen."""
    for line in warnings:
        click.secho(f"WARNING: {line}", err=True, fg="yellow", bold=True)


def run() -> None:
    """The ``retrain`` program: ``main`` as a command, then a prompt exit.

    Tearing down an interpreter that has loaded TensorFlow graphs takes about a second after
    the work is done (measured: 1.0-1.2 s of a 12 s warm ``train``). By then every output is
    complete, closed and moved into place, so the program flushes its streams and logging and
    ends the process without that teardown. ``main`` stays a plain click command (the tests
    call it in-process)."""
    import logging
    import os
    import sys

    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``retrain ... | head``): nothing left to say
            pass
    os._exit(code)


@click.group(cls=RetrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="retrain")
def main():
    """Train an image classifier that runs on a phone, from a folder of labelled images,
    by reusing a pre-trained image module and training only a new head."""


@main.command()
@click.argument("image_dir", type=click.Path(file_okay=False))
@click.option("--module", "-m", required=True, help="Local SavedModel folder or versioned TF Hub / Kaggle Models URL.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder for the model files.")
@click.option("--head", type=click.Choice(HEADS), default=DEFAULTS.head, show_default=True,
              help="'logistic': logistic regression solved to convergence on all vectors, its L2 strength chosen by "
                   "cross-validation; 'minibatch': Adam epochs with early stopping (the options --epochs to "
                   "--label-smoothing); 'auto': logistic up to 10,000 training vectors, minibatch above.")
@click.option("--cv-folds", type=int, default=DEFAULTS.cv_folds, show_default=True,
              help="Cross-validation folds that choose the logistic head's L2 strength (3 above 5,000 images).")
@click.option("--keep-validation", is_flag=True,
              help="Keep the validation split out of the logistic head's training (by default it is folded in: "
                   "cross-validation needs no held-out split; fine-tuning always keeps it).")
@click.option("--min-accuracy", type=float, default=None,
              help="Exit 1, writing nothing, when the test accuracy is below this (0-1), e.g. in a CI pipeline.")
@click.option("--epochs", type=int, default=DEFAULTS.epochs, show_default=True, help="Minibatch head: most epochs; early stopping may end sooner.")
@click.option("--patience", type=int, default=DEFAULTS.patience, show_default=True, help="Epochs without validation-loss improvement before stopping (0: never stop early).")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Head training batch size.")
@click.option("--extract-batch-size", type=int, default=None, show_default="128 at 224x224, fewer for larger images", help="Images per module call when computing bottlenecks.")
@click.option("--extract-backend", type=click.Choice(EXTRACT_BACKENDS), default=DEFAULTS.extract_backend, show_default=True,
              help="What computes bottlenecks: 'litert' (LiteRT's XNNPACK kernels, faster on a CPU; the module is "
                   "converted once and cached), 'tensorflow', or 'auto': LiteRT on a CPU when the converted module is "
                   "cached, or train converts it anyway for its TFLite file (no --fine-tune), or "
                   f"{AUTO_MIN_IMAGES:,} or more images are to be computed. LiteRT's vectors are checked "
                   "against TensorFlow's on a probe batch first.")
@click.option("--devices", type=int, default=DEFAULTS.devices, show_default="every GPU when two or more are visible, else one",
              help="Devices to extract and fine-tune on, under tf.distribute.MirroredStrategy, each batch split "
                   "over them (--extract-batch-size and --fine-tune-batch-size are per device); 1: one device.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=DEFAULTS.optimizer, show_default=True)
@click.option("--learning-rate", type=float, default=DEFAULTS.learning_rate, show_default=True)
@click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True, help="SGD momentum.")
@click.option("--dropout", type=float, default=DEFAULTS.dropout, show_default=True)
@click.option("--l2", type=float, default=DEFAULTS.l2, show_default=True, help="L2 penalty on the head's kernel.")
@click.option("--label-smoothing", type=float, default=DEFAULTS.label_smoothing, show_default=True)
@click.option("--validation-percent", type=float, default=DEFAULTS.validation_percent, show_default=True)
@click.option("--test-percent", type=float, default=DEFAULTS.test_percent, show_default=True)
@click.option("--validation-dir", type=click.Path(file_okay=False), help="Use this folder as the validation set instead of a split.")
@click.option("--test-dir", type=click.Path(file_okay=False), help="Use this folder as the test set instead of a split.")
@click.option("--image-size", type=int, help="Input size for modules that accept any size (or to check a fixed one).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Bottleneck cache folder [default: ~/.cache/retrain].")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--class-weight", type=click.Choice(CLASS_WEIGHTS), default=DEFAULTS.class_weight, show_default=True,
              help="'balanced' weighs each class's images by n_images / (n_classes * class count) in the loss, "
                   "so a small class is not outvoted.")
@click.option("--augment", is_flag=True,
              help="Augment training images (random flip, crop/zoom, brightness, contrast; never in the exported model): "
                   f"the head also learns from --augment-copies cached augmented bottlenecks per image ({AUGMENT_COPIES} "
                   "unless given), and --fine-tune augments every epoch.")
@click.option("--augment-copies", type=int, default=DEFAULTS.augment_copies,
              help=f"With --augment: augmented bottlenecks per training image, computed once and cached "
                   f"(0: only with --fine-tune, for on-the-fly augmentation alone).  [default: {AUGMENT_COPIES}]")
@click.option("--fine-tune", is_flag=True,
              help="After the head, train the module's weights too (batch norm statistics frozen), keeping the best "
                   "validation epoch, or the frozen module when no epoch beats it. Slow: a forward and backward "
                   "pass per image and epoch.")
@click.option("--fine-tune-epochs", type=int, default=DEFAULTS.fine_tune_epochs, show_default=True,
              help="Most fine-tuning epochs.")
@click.option("--fine-tune-learning-rate", type=float, default=DEFAULTS.fine_tune_learning_rate,
              help="Fine-tuning learning rate.  [default: --learning-rate / 10]")
@click.option("--fine-tune-batch-size", type=int, default=DEFAULTS.fine_tune_batch_size, show_default=True)
@click.option("--fine-tune-patience", type=int, default=DEFAULTS.fine_tune_patience, show_default=True,
              help="Fine-tuning epochs without validation improvement before stopping (0: never stop early).")
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), multiple=True,
              help="TFLite variant(s) beside float32, repeatable; 'none' for float32 only.  [default: int8]")
@click.option("--max-accuracy-drop", type=float, default=DEFAULTS.max_accuracy_drop, show_default=True,
              help="Accuracy points a quantized file may lose against float32 before a warning.")
@click.option("--calibration-samples", type=int, default=DEFAULTS.calibration_samples, show_default=True, help="Training images used to calibrate int8.")
@click.option("--allow-unversioned", is_flag=True, help="Accept a URL handle that names no version.")
@click.option("--trust-host", "trust_hosts", multiple=True, help="Also load modules from this host (repeatable; modules are executed code).")
@click.option("--allow-module-op", "allowed_module_ops", multiple=True, metavar="OP",
              help="Accept this op the module audit refuses (file, print, Python or network ops; repeatable, recorded in run.json).")
@click.option("--max-unusable-fraction", type=float, default=DEFAULTS.max_unusable_fraction, show_default=True,
              help="Stop when more than this fraction of a class's image files cannot be decoded.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier retrain model in the output folder (never any other folder).")
@_output_options
def train(image_dir, module, output, overwrite, quiet, as_json, quantize, **options):
    """Train a new head on IMAGE_DIR/<class>/<images> and export SavedModel + TFLite."""
    _setup(quiet, as_json)
    from .api import train as run_train

    if quantize:
        options["quantize"] = tuple(q for q in quantize if q != "none")
    result = run_train(image_dir, module, output, overwrite=overwrite, **options)
    _loud(result.warnings)
    if as_json:
        _emit_json(result.to_dict())
        return
    if not quiet:
        skipped_note(result.skipped, len(result.skipped), " (see run.json)")
    split = result.split
    click.echo(f"classes: {', '.join(result.classes)}")
    click.echo(f"images: {split['train']} train, {split['validation']} validation, {split['test']} test")
    click.echo(f"bottlenecks: {result.cache['misses']} computed, {result.cache['hits']} from cache "
               f"({result.timings['bottlenecks']:.1f} s)")
    balance_line(result.class_balance)
    augmented = result.augment.get("cache")
    if augmented:
        click.echo(f"augmented bottlenecks: {result.augment['copies']} per training image, {augmented['misses']} computed, "
                   f"{augmented['hits']} from cache ({result.timings['augment']:.1f} s)")
    if result.fine_tune:
        fine_tune_line(result.fine_tune, result.timings["fine_tune"])
    head_line(result.head)
    if "validation" in result.metrics:
        click.echo(f"validation accuracy: {accuracy(result.metrics['validation'])}")
    if "cross_validation" in result.metrics:
        cv = result.metrics["cross_validation"]
        click.echo(f"cross-validated accuracy: {accuracy(cv)}, {cv['folds']} folds")
    if "test" in result.metrics:
        test = result.metrics["test"]
        click.echo(f"test accuracy: {accuracy(test)}")
        click.echo("test recall per class: " + ", ".join(f"{name} {row['recall']:.4f}" for name, row in test["per_class"].items()))
    tflite_table(result.metrics.get("tflite", {}))
    label_errors_line(result.label_errors, result.artifacts.get("label_errors"))
    click.echo(f"model: {result.output}")
    for name, path in result.artifacts.items():
        click.echo(f"  {name}: {path}")


@main.command()
@click.argument("model", type=click.Path())
@click.argument("image_dir", type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write a report folder: index.html, confusion matrix PNG/CSV, per-class CSV, confident mistakes.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in the --report folder (never any other folder).")
@_output_options
def evaluate(model, image_dir, batch_size, report_dir, overwrite, quiet, as_json):
    """Accuracy, per-class figures and confusion matrix of MODEL (output folder, SavedModel or .tflite) on IMAGE_DIR."""
    _setup(quiet, as_json)
    from .api import evaluate as run_evaluate

    reads = {"model": model, "image folder": image_dir}
    if report_dir:
        from .evaluation.report import check_report_folder

        check_report_folder(report_dir, overwrite, reads)  # before the images are read, not after
    result = run_evaluate(model, image_dir, batch_size)
    written = None
    if report_dir:
        from .evaluation.report import write_report

        written = write_report(result, report_dir, overwrite=overwrite, reads=reads)
    if as_json:
        data = result.to_dict()
        if written:
            data["report"] = written["index"]
        _emit_json(data)
        return
    from .evaluation.evaluate import accuracy_text, small_set_note

    click.echo(f"{result.kind} {result.model}: accuracy {accuracy_text(result.accuracy, result.n_images, result.accuracy_interval)}")
    note = small_set_note(result.n_images, "evaluation")
    if note:
        click.echo(f"note: {note}", err=True)
    width = max(len(c) for c in result.classes)
    click.echo(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in result.per_class.items():
        click.echo(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:.4f}  {row['support']:7d}")
    click.echo("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(result.classes, result.confusion_matrix):
        click.echo(f"{name:<{width}}  " + " ".join(f"{v:6d}" for v in row))
    if result.top_k_accuracy:
        click.echo("top-k accuracy: " + ", ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in result.top_k_accuracy.items()))
    if written:
        click.echo(f"report: {written['index']}")
    if not quiet:
        skipped_note(result.skipped, len(result.skipped))


@main.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", "-k", type=int, default=1, show_default=True)
@_output_options
def predict(model, images, top_k, quiet, as_json):
    """Top-K classes for IMAGES (files or folders); --json prints one JSON object per image."""
    _setup(quiet, as_json)
    from .api import predict as run_predict

    results = run_predict(model, list(images), top_k)
    for item in results:
        if as_json:
            click.echo(json.dumps(item.to_dict()))
        elif item.error:
            click.echo(f"{item.path}: skipped ({item.error})", err=True)
        else:
            click.echo(f"{item.path}: " + ", ".join(f"{t['class']} {t['probability']:.4f}" for t in item.top))
    if results and all(item.error for item in results):
        raise click.ClickException("no image could be read")


@main.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--format", "formats", type=click.Choice(list(EXPORT_FORMATS)), multiple=True, required=True, help="Repeatable.")
@click.option("--representative", type=click.Path(file_okay=False), help="Image folder for int8 calibration [default: the training folder].")
@click.option("--calibration-samples", type=int, help="Images used to calibrate int8 [default: as trained].")
@click.option("--max-accuracy-drop", type=float, help="Accuracy points a quantized file may lose before a warning [default: as trained].")
@_output_options
def export(output, formats, representative, calibration_samples, max_accuracy_drop, quiet, as_json):
    """(Re)write TFLite variants of a retrain OUTPUT folder and check each on its test split."""
    _setup(quiet, as_json)
    from .api import export as run_export

    result = run_export(output, [EXPORT_FORMATS[f] for f in formats], representative, calibration_samples, max_accuracy_drop)
    _loud(result["warnings"])
    if as_json:
        _emit_json(result)
        return
    tflite_table(result["tflite"])
    for name, path in result["artifacts"].items():
        click.echo(f"{name}: {path}")


@main.command(context_settings={"allow_interspersed_args": True})
@click.argument("images")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- BEAM_OPTION...]")
@click.option("--module", "-m", required=True, help="Local SavedModel folder, object-store folder (gs://...) or versioned URL.")
@click.option("--cache-dir", help="Bottleneck cache folder train reads (or an object-store prefix)  [default: ~/.cache/retrain].")
@click.option("--runner", default="DirectRunner", show_default=True,
              help="Beam runner: DirectRunner (Beam's Python runner, on this machine), DataflowRunner, FlinkRunner, SparkRunner, ...")
@click.option("--workers", type=int, default=None,
              help="DirectRunner worker processes (--direct_running_mode multi_processing above 1).  [default: 1, in this process]")
@click.option("--batch-size", type=int, default=None, show_default="128 at 224x224, fewer for larger images",
              help="Images per module call.")
@click.option("--shard-size", type=int, default=None,
              help="Vectors per cache shard a worker writes: a kill loses at most the unwritten part of one shard "
                   "per worker.  [default: 512]")
@click.option("--image-size", type=int, help="Input size for modules that accept any size (give train the same).")
@click.option("--allow-unversioned", is_flag=True, help="Accept a URL handle that names no version.")
@click.option("--trust-host", "trust_hosts", multiple=True, help="Also load modules from this host (repeatable; modules are executed code).")
@click.option("--allow-module-op", "allowed_ops", multiple=True, metavar="OP",
              help="Accept this op the module audit refuses (repeatable; every worker audits the module).")
@_output_options
def extract(images, beam_args, module, quiet, as_json, **options):
    """Compute the bottlenecks of IMAGES (a folder of class sub-folders, a glob or a file list) in an
    Apache Beam pipeline and write them to the cache that train reads. Options after -- go to Beam."""
    _setup(quiet, as_json)
    from .features.beam import extract as run_extract  # needs the extra retrain[beam]

    result = run_extract(images, module, beam_args=beam_args, **options)
    if as_json:
        _emit_json(result.to_dict())
        return
    if not quiet:
        skipped_note(result.skipped, result.skipped_total)
    click.echo(f"{result.images} images: {result.computed} computed, {result.already_cached} already cached, "
               f"{result.duplicates} identical to another file")
    workers = f", {result.processes} worker process(es) computing" if result.processes else ""
    click.echo(f"runner: {result.runner}{workers}, {result.seconds:.1f} s")
    click.echo(f"cache: {result.cache_dir} ({result.shards} shard(s) written)")


@main.group()
def cache():
    """Inspect or clear the bottleneck cache."""


@cache.command("info")
@click.option("--cache-dir", type=click.Path(file_okay=False))
@_output_options
def cache_info(cache_dir, quiet, as_json):
    """Size of the cache, per module and preprocessing."""
    from .features.bottlenecks import cache_summary

    summary = cache_summary(cache_dir)
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"cache: {summary['path']} ({summary['bytes'] / 1e6:.1f} MB)")
    for entry in summary["entries"]:
        click.echo(f"  {entry['name']}: {entry['vectors']} vectors in {entry['shards']} shard(s), {entry['bytes'] / 1e6:.1f} MB "
                   f"(index {entry['index_bytes'] / 1e6:.1f} MB)")


@cache.command("clear")
@click.option("--cache-dir", type=click.Path(file_okay=False))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(cache_dir, yes):
    """Delete every cached bottleneck (only the cache's own files; a folder that is not a retrain cache is refused)."""
    from .features.bottlenecks import cache_summary, clear_cache

    summary = cache_summary(cache_dir)
    if not yes:
        click.confirm(f"Delete {summary['path']} ({summary['bytes'] / 1e6:.1f} MB)?", abort=True)
    removed = clear_cache(cache_dir)
    click.echo(f"removed {removed} file(s) from {summary['path']}")


@main.group()
def module():
    """Inspect modules, or export a trained one as a reusable module."""


@module.command("inspect")
@click.argument("handle")
@click.option("--image-size", type=int)
@click.option("--allow-unversioned", is_flag=True)
@click.option("--trust-host", "trust_hosts", multiple=True)
@click.option("--allow-module-op", "allowed_ops", multiple=True, metavar="OP")
@_output_options
def module_inspect(handle, image_size, allow_unversioned, trust_hosts, allowed_ops, quiet, as_json):
    """Resolve HANDLE, audit its ops and show its input size, feature dimension and fingerprint."""
    _setup(quiet, as_json)
    from .features.audit import check_allowed_ops
    from .features.module import load_module

    info = load_module(handle, image_size, allow_unversioned, tuple(trust_hosts),
                       allowed_ops=check_allowed_ops(allowed_ops)).info.to_dict()
    if as_json:
        _emit_json(info)
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")


@module.command("export")
@click.argument("output", type=click.Path(file_okay=False))
@click.argument("module_dir", type=click.Path(file_okay=False))
@click.option("--license", "license_name", metavar="NAME",
              help="License of the exported weights, copied into the README and the upload command (e.g. 'Apache 2.0', "
                   "as Kaggle names it); retrain cannot know it: it follows the source module's (and maybe the images').")
@click.option("--owner", metavar="SLUG", help="Kaggle user or organisation for model-metadata.json [default: Kaggle's placeholder].")
@click.option("--source-module", metavar="HANDLE",
              help="Load the source module from here instead of the handle run.json records (its fingerprint must match).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier exported module in MODULE_DIR (never any other folder).")
@_output_options
def module_export(output, module_dir, license_name, owner, source_module, overwrite, quiet, as_json):
    """Write the module of a retrain OUTPUT folder (fine-tuned or not) to MODULE_DIR as a reusable
    TF Hub style feature-vector module, with a README and Kaggle Models metadata (nothing is uploaded)."""
    _setup(quiet, as_json)
    from .api import export_module

    result = export_module(output, module_dir, license=license_name, owner=owner, source_module=source_module,
                           overwrite=overwrite)
    _loud(result.warnings)
    if as_json:
        _emit_json(result.to_dict())
        return
    checks = result.checks
    state = (f"fine-tuned, {result.variables_changed} of {result.variables} variables changed" if result.weights_changed
             else "not fine-tuned: the source module's weights")
    click.echo(f"source: {result.source['handle']} (fingerprint {result.source['fingerprint'][:16]}); {state}")
    click.echo(f"module: {result.module_dir} (fingerprint {result.fingerprint[:16]}), input [batch, "
               f"{result.input_spec['height']}, {result.input_spec['width']}, 3] in [0, 1], output [batch, {result.feature_dim}]; "
               f"{result.variables} variables, {result.trainable_variables} trainable")
    click.echo(f"checked on {checks['probe_images']} probe images: vectors max abs diff {checks['max_abs_diff_features']:.3g} "
               f"from the trained module, probabilities {checks['max_abs_diff_probabilities']:.3g} from {output}")
    for name, path in result.artifacts.items():
        click.echo(f"  {name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
