"""``retrain module export``: a train output's module, fine-tuned or not, as a reusable module.

The result is a TF2 reusable SavedModel in the TF Hub image feature-vector form (tensorflow/hub
``docs/reusable_saved_models.md``, ``docs/common_saved_model_apis/images.md``): the root object
has ``__call__(images, training=False)`` traced for both values of ``training``, float32
``[batch, H, W, 3]`` RGB in [0, 1] at the module's size in, ``[batch, dim]`` out; ``variables``,
``trainable_variables`` and ``regularization_losses``; and a ``serving_default`` signature
(``images`` -> ``feature_vector``). It loads as ``hub.load``, ``hub.KerasLayer(path,
trainable=True)`` and ``retrain train --module`` load a published module.

The train output's SavedModel cannot give it: it keeps only the inference path of the module
(``build_serving_model`` tracks the variables, not the module's functions). So the source module
is loaded again (the handle and fingerprint in ``run.json``; a different fingerprint is refused),
the trained values are copied from the output's checkpoint into its variables, matched by the
order ``build_serving_model`` saved them in, and a new root object around its functions is saved.
Before anything is moved into place the new module is loaded back and compared, on a probe batch,
with the source module holding the trained values (its vectors) and with the output's own
SavedModel (the probabilities of those vectors through the trained head).

The folder holds the SavedModel files, ``README.md`` (source, training, contract, license,
checks, how to upload), ``model-metadata.json`` (the Kaggle Models model record) and
``retrain-module.json`` (this export's record and the marker that makes the folder replaceable by
a later export, safety.MODULE). The fingerprint recorded is that of the SavedModel files alone:
the three documentation files cannot hold a digest over themselves, and they are left out of the
upload (``ignore_patterns``), so a downloaded copy has exactly this fingerprint.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from .._tf import tf as _tf
from ..errors import ModelError, ModuleError, first_line
from ..files import make_stage, remove_stage, staged_output
from ..safety import MODEL, MODULE, check_apart, check_output_folder, manifest

SAVED_MODEL_FILES = ("saved_model.pb", "fingerprint.pb", "variables", "assets")  # what tf.saved_model.save writes
README_FILE = "README.md"
KAGGLE_METADATA_FILE = "model-metadata.json"  # read by `kaggle models create -p FOLDER`
DOC_FILES = (README_FILE, KAGGLE_METADATA_FILE, MODULE.marker)  # beside the SavedModel, not uploaded
OUTPUT_NAME = "feature_vector"  # the serving_default signature's output
KAGGLE_FRAMEWORK = "tensorFlow2"
KAGGLE_VARIATION = "feature-vector"
OWNER_PLACEHOLDER = "INSERT_OWNER_SLUG_HERE"  # Kaggle's own placeholder: its tools refuse it until replaced
PROBE_IMAGES = 8
PROBE_SEED = 20240611
# Same weights, same functions, other graphs around them: only float rounding may differ.
FEATURE_TOLERANCE = 1e-4  # relative to the largest feature magnitude (at least 1)
PROBABILITY_TOLERANCE = 1e-4
_STATISTICS = re.compile(r"moving_(mean|variance)|running_(mean|var)")  # batch-norm statistics, by their usual names


@dataclass
class ModuleExport:
    """What ``export_module`` wrote and measured."""

    module_dir: str
    source: dict  # handle, path, fingerprint of the module the run trained on
    fingerprint: str  # of the SavedModel files alone (what an upload without the documentation files holds)
    folder_fingerprint: str  # of the folder as written, documentation files included (what `--module DIR` records)
    input_spec: dict
    feature_dim: int
    variables: int
    trainable_variables: int
    regularization_losses: int
    weights_changed: bool  # the run fine-tuned the module and kept the tuned weights
    variables_changed: int  # variables whose trained value differs from the source module's
    fine_tuned_on: dict  # classes, image counts, epochs...
    checks: dict  # probe images, max abs differences
    license: str | None
    artifacts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --- reading the train output ----------------------------------------------------------------------


def _read_train_output(model_dir: Path) -> dict:
    from ..records import RUN_FILE, SAVED_MODEL_DIR

    run_file = model_dir / RUN_FILE
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a folder: give a `retrain train` output folder")
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = None
    if not MODEL.owns(run):
        raise ModelError(f"{model_dir} is not a retrain output folder (no {RUN_FILE} written by `retrain train`)")
    if not isinstance(run.get("module"), dict) or "fingerprint" not in run["module"]:
        raise ModelError(f"{run_file} records no module fingerprint: train again with this retrain version")
    if not (model_dir / SAVED_MODEL_DIR / "variables" / "variables.index").is_file():
        raise ModelError(f"{model_dir} has no {SAVED_MODEL_DIR}/variables: not a complete retrain output folder")
    return run


def _load_source(run: dict, model_dir: Path, source_module: str | None):
    """The module the run trained on, by the handle run.json records (or ``source_module``),
    refused unless its files have the recorded fingerprint."""
    from ..features.module import is_url, load_module

    record, config = run["module"], run.get("config") or {}
    handle = source_module or record["handle"]
    try:
        # As the run loaded it: the same size, trust and ops the user accepted then.
        loaded = load_module(handle, config.get("image_size"), config.get("allow_unversioned", False),
                             tuple(config.get("trust_hosts") or ()), records_dir=config.get("cache_dir"),
                             allowed_ops=tuple(config.get("allowed_module_ops") or ()))
    except ModuleError as error:
        gone = not Path(handle).expanduser().exists() if not is_url(handle) else "cannot download" in str(error)
        hint = ("; put it back, or pass --source-module with a copy of it (its fingerprint is checked)"
                if gone and not source_module else "")
        raise ModuleError(f"the source module of {model_dir} cannot be loaded, and export needs its functions: "
                          f"{error}{hint}") from None
    if loaded.info.fingerprint != record["fingerprint"]:
        raise ModuleError(
            f"module {handle} has fingerprint {loaded.info.fingerprint[:16]}, but {model_dir} was trained on "
            f"{record['fingerprint'][:16]}: export needs the very module the run used"
        )
    recorded_spec = record.get("input_spec") or {}
    spec = loaded.info.input_spec
    if recorded_spec and [recorded_spec.get("height"), recorded_spec.get("width")] != [spec.height, spec.width]:
        raise ModuleError(f"module {handle} loads at {spec.height}x{spec.width}, but {model_dir} was trained at "
                          f"{recorded_spec.get('height')}x{recorded_spec.get('width')}")
    return loaded


def _copy_trained_values(loaded, model_dir: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Assign the output's trained values to the source module's variables.

    The order is the one ``build_serving_model`` saves them in; building it again here (with the
    saved head) gives the very list, so no second copy of that rule exists. Every saved
    ``module_variables/<i>`` must meet a variable of its shape and dtype, and every variable a
    saved value. Returns the head (kernel, bias), how many variables there are and how many
    values differ from the source's."""
    from ..records import SAVED_MODEL_DIR
    from .tflite import LABELS_FILE, build_serving_model

    tf = _tf()
    saved = model_dir / SAVED_MODEL_DIR
    try:
        reader = tf.train.load_checkpoint(str(saved / "variables" / "variables"))
    except Exception as error:  # a damaged checkpoint raises DataLossError, NotFoundError...
        raise ModelError(f"cannot read the checkpoint of {saved}: {first_line(error)}") from None
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    for key in ("head_kernel", "head_bias"):
        if key + suffix not in shapes:
            raise ModelError(f"{saved} holds no {key}: not a SavedModel written by `retrain train`")
    kernel, bias = reader.get_tensor("head_kernel" + suffix), reader.get_tensor("head_bias" + suffix)
    labels = model_dir / LABELS_FILE
    serving = build_serving_model(loaded, kernel, bias, str(labels if labels.is_file() else saved / "assets" / LABELS_FILE))
    variables = list(serving.module_variables)
    stored = sorted(int(m.group(1)) for key in shapes if (m := re.fullmatch(r"module_variables/(\d+)" + re.escape(suffix), key)))
    if stored != list(range(len(variables))):
        raise ModelError(f"{saved} holds {len(stored)} module variables, but module {loaded.info.handle} has "
                         f"{len(variables)}: it was not trained on this module")
    values = []
    for index, variable in enumerate(variables):
        key = f"module_variables/{index}{suffix}"
        shape, dtype = list(shapes[key]), dtypes[key]
        if shape != list(variable.shape) or dtype != variable.dtype:
            raise ModelError(
                f"{saved}: module variable {index} is {dtype.name}{shape}, but {variable.name} of module "
                f"{loaded.info.handle} is {variable.dtype.name}{list(variable.shape)}: it was not trained on this module"
            )
        values.append(reader.get_tensor(key))
    changed = 0
    for variable, value in zip(variables, values):
        changed += int(not np.array_equal(variable.numpy(), value))
        variable.assign(value)
    return kernel, bias, len(variables), changed


# --- the reusable module -------------------------------------------------------------------------


def _traced_training_values(obj) -> set:
    """The values of ``training`` a loaded object's ``__call__`` was traced for."""
    values = set()
    for function in getattr(getattr(obj, "__call__", None), "concrete_functions", None) or ():
        args, kwargs = function.structured_input_signature
        value = args[1] if len(args) > 1 else kwargs.get("training")
        if isinstance(value, bool):
            values.add(value)
    return values


def _training_call(obj):
    """``obj(x, training=True)`` when the module's ``__call__`` was traced with ``training=True``,
    else None (the inference call then serves both values, as for a signature-only module)."""
    if True in _traced_training_values(obj):
        return lambda images: obj(images, training=True)
    return None


def _regularizer(function):
    tf = _tf()
    return tf.function(lambda: function(), input_signature=[], autograph=False)


def build_reusable_module(loaded):
    """A ``tf.Module`` around the loaded source module's functions and variables, in the reusable
    SavedModel form (see the module docstring). Returns it with ``__call__`` traced for both
    ``training`` values and ``serve`` for the signature."""
    tf = _tf()
    obj, spec = loaded.obj, loaded.info.input_spec
    low, high = spec.value_range
    inference = loaded.features  # the very call retrain extracted, trained and served with
    training_call = _training_call(obj) or inference
    image_spec = tf.TensorSpec([None, spec.height, spec.width, 3], tf.float32, name="images")

    def module_range(images):
        # The published contract is RGB in [0, 1]; a module taking another range gets it here.
        return images if (low, high) == (0.0, 1.0) else images * (high - low) + low

    listed = list(getattr(obj, "variables", None) or [])
    trainable = list(getattr(obj, "trainable_variables", None) or [])
    losses = [_regularizer(f) for f in (getattr(obj, "regularization_losses", None) or [])]

    class ReusableModule(tf.Module):
        # Plain attributes instead of tf.Module's properties, so the SavedModel lists them.
        variables = None
        trainable_variables = None
        regularization_losses = None

        def __init__(self):
            super().__init__(name="feature_vector")
            self.regularization_losses = losses

        @tf.function(autograph=False)
        def __call__(self, images, training=False):
            return (training_call if training else inference)(module_range(images))

        @tf.function(input_signature=[image_spec], autograph=False)
        def serve(self, images):
            return {OUTPUT_NAME: inference(module_range(images))}

    root = ReusableModule()
    traced = [root.__call__.get_concrete_function(image_spec, training=value) for value in (False, True)]
    # The module's own list first, then any trainable one it left out, then anything else the
    # traced calls capture (a module that lists no variables, such as a signature-only one):
    # saving needs every captured variable tracked, and `variables` must hold the trainable ones.
    variables, known = [], set()
    for variable in [*listed, *trainable, *(v for function in traced for v in function.variables)]:
        if id(variable) not in known:
            known.add(id(variable))
            variables.append(variable)
    root.variables = variables
    root.trainable_variables = trainable
    return root


# --- checks ----------------------------------------------------------------------------------------


def _verify(saved_dir: Path, root, loaded, model_dir: Path, kernel, bias) -> dict:
    """Load the written module back and compare it, on a probe batch, with the source module
    holding the trained values and with the train output's SavedModel."""
    from ..data.images import to_module_input
    from ..records import SAVED_MODEL_DIR
    from .tflite import OUTPUT_KEY, SIGNATURE_FIXED

    tf = _tf()
    spec = loaded.info.input_spec
    try:
        reloaded = tf.saved_model.load(str(saved_dir))
    except Exception as error:
        raise ModelError(f"the module written cannot be loaded back: {first_line(error)}") from None
    if _traced_training_values(reloaded) != {False, True}:
        raise ModelError("the module written lacks __call__ traced for training=False and training=True")
    if "serving_default" not in reloaded.signatures:
        raise ModelError("the module written lacks its serving_default signature")
    counts = {name: (len(getattr(reloaded, name)), len(getattr(root, name)))
              for name in ("variables", "trainable_variables", "regularization_losses")}
    for name, (found, expected) in counts.items():
        if found != expected:
            raise ModelError(f"the module written lists {found} {name}, {expected} expected")
    rng = np.random.default_rng(PROBE_SEED)
    pixels = tf.constant(rng.integers(0, 256, (PROBE_IMAGES, spec.height, spec.width, 3), dtype=np.uint8))
    images = to_module_input(pixels, (0.0, 1.0))  # the published contract: RGB in [0, 1]
    reference = loaded.pixel_features(pixels).numpy()  # the source module with the trained values
    vectors = reloaded(images, training=False).numpy()
    signature = reloaded.signatures["serving_default"](images=images)[OUTPUT_NAME].numpy()
    in_training = reloaded(images, training=True)  # runs, on this throwaway copy (batch norm may update it)
    if list(in_training.shape) != list(vectors.shape):
        raise ModelError(f"the module written returns {list(in_training.shape)} with training=True, "
                         f"{list(vectors.shape)} with training=False")
    scale = max(1.0, float(np.abs(reference).max()))
    feature_diff = float(np.abs(vectors - reference).max())
    signature_diff = float(np.abs(signature - vectors).max())
    served = tf.saved_model.load(str(model_dir / SAVED_MODEL_DIR)).signatures[SIGNATURE_FIXED]
    expected = served(images=pixels)[OUTPUT_KEY].numpy()
    probabilities = tf.nn.softmax(vectors @ kernel + bias).numpy()
    probability_diff = float(np.abs(probabilities - expected).max())
    if feature_diff > FEATURE_TOLERANCE * scale or signature_diff > FEATURE_TOLERANCE * scale:
        raise ModelError(f"the module written gives vectors up to {max(feature_diff, signature_diff):.3g} away from "
                         f"the trained module's on the same pixels: nothing was written")
    if probability_diff > PROBABILITY_TOLERANCE:
        raise ModelError(f"the module written, through the trained head, gives probabilities up to "
                         f"{probability_diff:.3g} away from {model_dir / SAVED_MODEL_DIR}: nothing was written")
    return {
        "probe_images": PROBE_IMAGES, "probe_seed": PROBE_SEED,
        "max_abs_diff_features": feature_diff,  # reloaded module vs source module with the trained values
        "max_abs_diff_signature": signature_diff,  # serving_default vs __call__(training=False)
        "max_abs_diff_probabilities": probability_diff,  # module + trained head vs the output's SavedModel
        "feature_scale": float(np.abs(reference).max()),
        "training_call_shape": list(in_training.shape),
    }


# --- the documentation files ---------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (slug or "feature-vector")[:50]


def _fine_tuned_on(run: dict) -> dict:
    fine = run.get("fine_tune") or {}
    record = {
        "classes": run.get("classes", []),
        "split": run.get("split", {}),
        "image_dir": run.get("image_dir"),
        "weights_changed": bool(run.get("module", {}).get("weights_changed")),
    }
    if fine:
        record.update({key: fine.get(key) for key in ("kept", "epochs_run", "best_epoch", "learning_rate",
                                                       "frozen_validation", "best_validation")})
        record["frozen_validation"] = {k: fine["frozen_validation"].get(k) for k in ("loss", "accuracy", "n_images")}
        record["best_validation"] = {k: fine["best_validation"].get(k) for k in ("loss", "accuracy", "n_images")}
    return record


def _upload_snippet(owner: str, slug: str, license_name: str | None, module_dir: str) -> str:
    """The two commands that publish the folder (shell-quoted, so any path pastes as it is)."""
    license_arg = f"license_name={json.dumps(license_name)}, " if license_name else ""
    code = (f"import kagglehub; kagglehub.model_upload({json.dumps(_kaggle_handle(owner, slug))}, "
            f"{json.dumps(module_dir)}, {license_arg}version_notes=\"retrain module export\", "
            f"ignore_patterns={json.dumps(list(DOC_FILES))})")
    return (f"kaggle models create -p {shlex.quote(module_dir)}   # the model record, from {KAGGLE_METADATA_FILE}\n"
            f"python -c {shlex.quote(code)}")


def _kaggle_handle(owner: str, slug: str) -> str:
    return f"{owner}/{slug}/{KAGGLE_FRAMEWORK}/{KAGGLE_VARIATION}"


def _readme(result: ModuleExport, model_dir: Path, owner: str, slug: str, for_kaggle: bool = False) -> str:
    """The folder's README; ``for_kaggle``: the model page's description instead (the module by its
    Kaggle handle, no local train output path, no upload section)."""
    source, spec, tuned, checks = result.source, result.input_spec, result.fine_tuned_on, result.checks
    split = tuned.get("split", {})
    counts = ", ".join(f"{split.get(name, 0)} {name}" for name in ("train", "validation", "test"))
    if tuned.get("kept") == "fine_tuned":
        training = (f"Fine-tuned by `retrain train --fine-tune` on {len(tuned['classes'])} classes "
                    f"({', '.join(tuned['classes'])}; images: {counts}): {tuned['epochs_run']} epoch(s), best epoch "
                    f"{tuned['best_epoch']}, learning rate {tuned['learning_rate']:g}, batch-norm statistics frozen. "
                    f"Validation accuracy {tuned['frozen_validation']['accuracy']:.4f} -> "
                    f"{tuned['best_validation']['accuracy']:.4f}, loss {tuned['frozen_validation']['loss']:.4f} -> "
                    f"{tuned['best_validation']['loss']:.4f}. {result.variables_changed} of {result.variables} "
                    f"variables differ from the source module.")
    elif tuned.get("kept") == "frozen":
        training = (f"`retrain train --fine-tune` ran {tuned['epochs_run']} epoch(s) on {len(tuned['classes'])} classes "
                    f"({', '.join(tuned['classes'])}; images: {counts}) and no epoch beat the frozen module, so its "
                    f"weights were kept: this module computes the source module's vectors.")
    else:
        training = (f"Not fine-tuned: the run trained only a head on {len(tuned['classes'])} classes "
                    f"({', '.join(tuned['classes'])}; images: {counts}), so this module computes the source "
                    f"module's vectors.")
    trainable_statistics = result.checks.get("trainable_statistics") or []
    statistics = (f"; batch-norm statistics among them: {', '.join(trainable_statistics)}" if trainable_statistics
                  else "; no batch-norm statistics among them")
    location = (f"kagglehub.model_download({_kaggle_handle(owner, slug)!r})" if for_kaggle
                else repr(result.module_dir))
    upload = f"""
## Publishing on Kaggle Models (nothing was uploaded)

`{KAGGLE_METADATA_FILE}` is the model record `kaggle models create` reads (owner `{owner}`, slug
`{slug}`, private); replace the owner if it is the placeholder. Then upload the SavedModel files as
a `{KAGGLE_FRAMEWORK}` variation, leaving the documentation files out:

```
{_upload_snippet(owner, slug, result.license, result.module_dir)}
```
"""
    license_line = result.license or "not stated (pass `--license` to `retrain module export`)"
    saved_names = ", ".join(f"`{name}`" for name in SAVED_MODEL_FILES)
    return f"""# Image feature-vector module exported by retrain

A TF2 reusable SavedModel (the TF Hub image feature-vector form), written by
`retrain module export` {__version__} on {datetime.now(timezone.utc).date().isoformat()}.

| | |
| --- | --- |
| source module | `{source['handle']}` |
| source fingerprint | `{source['fingerprint']}` |
| this module's fingerprint | `{result.fingerprint}` |
| license | {license_line} |
| input | float32 `[batch, {spec['height']}, {spec['width']}, 3]`, RGB in [0, 1] (resize with bilinear filtering first) |
| output | float32 `[batch, {result.feature_dim}]` feature vectors |
| variables | {result.variables} ({result.trainable_variables} trainable{statistics}), {result.regularization_losses} regularization losses |

## What it was trained on

{training}

This module's fingerprint is SHA-256 over its SavedModel files ({saved_names}), as `retrain`
computes it for any module: what a copy of those files alone has (the upload leaves the others out). This
folder as a whole (with README.md, {KAGGLE_METADATA_FILE} and {MODULE.marker}, which cannot hold a
digest over themselves) has another one: `retrain module inspect` shows it, and `retrain train
--module` records it when it loads the folder itself.

## Use

```python
import {"kagglehub, " if for_kaggle else ""}tensorflow_hub as hub, tf_keras

path = {location}
layer = hub.KerasLayer(path, trainable=True)  # False: frozen features
model = tf_keras.Sequential([tf_keras.Input(({spec['height']}, {spec['width']}, 3)), layer,
                             tf_keras.layers.Dense(NUM_CLASSES)])
vectors = hub.load(path)(images, training=False)  # or the serving_default signature
```

```
retrain train IMAGE_DIR --module {"PATH" if for_kaggle else shlex.quote(result.module_dir)} --output OUT [--fine-tune]
```

`__call__(images, training=False)` is traced for both values of `training` (`training=True` is the
source module's training mode, batch-norm updates included); `serving_default` maps `images` to
`{OUTPUT_NAME}`.

## Checks made when it was written

Loaded back and run on {checks['probe_images']} probe images (seeded noise, seed {checks['probe_seed']}):
its vectors differ from the source module holding the trained values by at most
{checks['max_abs_diff_features']:.3g} (largest vector entry {checks['feature_scale']:.3g}); `serving_default`
from `__call__` by {checks['max_abs_diff_signature']:.3g}; through the trained head, its probabilities
differ from the train output's SavedModel{"" if for_kaggle else f" (`{model_dir}`)"} by {checks['max_abs_diff_probabilities']:.3g}.
{"" if for_kaggle else upload}
"""


def _kaggle_metadata(result: ModuleExport, owner: str, slug: str, description: str) -> dict:
    tuned = result.fine_tuned_on
    what = "fine-tuned" if tuned.get("kept") == "fine_tuned" else "exported"
    return {
        "ownerSlug": owner,
        "title": f"{slug} feature vector"[:50],
        "slug": slug,
        "subtitle": f"Image feature vectors ({result.feature_dim}), {what} by retrain from {Path(result.source['handle']).name}"[:80],
        "isPrivate": True,  # publishing is a deliberate step
        "description": description,
        "publishTime": "",
        "provenanceSources": result.source["handle"],
    }


# --- the command -----------------------------------------------------------------------------------


def export_module(model_dir, module_dir, *, license: str | None = None, owner: str | None = None,
                  source_module: str | None = None, overwrite: bool = False) -> ModuleExport:
    """Write the module of the train output ``model_dir`` (fine-tuned or not) to ``module_dir`` as a
    reusable feature-vector module (see the module docstring). ``license`` is copied into the
    README and the upload command; ``owner`` (Kaggle user or organisation) into
    model-metadata.json; ``source_module`` replaces the handle run.json records (its fingerprint is
    checked all the same). ``module_dir`` is replaced only when it holds an earlier export and
    ``overwrite`` is set."""
    from ..features.module import fingerprint
    from ..pipeline import output_target

    started = time.perf_counter()
    model_dir = Path(model_dir).expanduser()
    shown = Path(module_dir).expanduser()
    target = output_target(shown)
    run = _read_train_output(model_dir)
    handle = source_module or run["module"]["handle"]
    check_apart({"module folder": shown}, {"model folder": model_dir,
                                           "source module folder": None if _is_url(handle) else handle})
    check_output_folder(target, MODULE, overwrite)
    loaded = _load_source(run, model_dir, source_module)
    check_apart({"module folder": shown}, {"source module folder": loaded.info.path})  # a URL's TF Hub cache folder
    kernel, bias, n_variables, changed = _copy_trained_values(loaded, model_dir)
    try:
        root = build_reusable_module(loaded)
    except Exception as error:  # the source's functions cannot be traced at the module's size
        raise ModelError(f"the module of {model_dir} cannot be wrapped as a reusable module: {first_line(error)}") from None
    warnings = []
    if not root.trainable_variables:
        warnings.append(f"module {loaded.info.handle} lists no trainable variables: the exported module cannot be fine-tuned")
    statistics = [v.name for v in root.trainable_variables if _STATISTICS.search(v.name)]
    if statistics:
        warnings.append(f"the source module lists batch-norm statistics as trainable (e.g. {statistics[0]}): so does the export")
    if not license:
        warnings.append("no --license given: the README says the license is not stated; the weights carry the "
                        "source module's license terms (and perhaps the training images')")
    owner = owner or OWNER_PLACEHOLDER
    slug = _slug(shown.name)
    tf = _tf()
    scratch = make_stage(target)  # the SavedModel alone, so that its fingerprint covers only its files
    try:
        saved_dir = scratch / "module"
        try:
            tf.saved_model.save(root, str(saved_dir), signatures={"serving_default": root.serve.get_concrete_function()})
        except Exception as error:  # an untracked resource, an op that cannot be saved...
            raise ModelError(f"the module of {model_dir} cannot be saved as a reusable module: {first_line(error)}") from None
        digest = fingerprint(saved_dir)
        checks = {**_verify(saved_dir, root, loaded, model_dir, kernel, bias), "trainable_statistics": statistics}
        record = run["module"]
        result = ModuleExport(
            module_dir=str(shown), source={"handle": loaded.info.handle, "path": loaded.info.path,
                                           "fingerprint": record["fingerprint"]},
            fingerprint=digest, folder_fingerprint="", input_spec=loaded.info.input_spec.to_dict(),
            feature_dim=loaded.info.feature_dim, variables=len(root.variables),
            trainable_variables=len(root.trainable_variables), regularization_losses=len(root.regularization_losses),
            weights_changed=bool(record.get("weights_changed")), variables_changed=changed,
            fine_tuned_on=_fine_tuned_on(run), checks=checks, license=license, warnings=warnings,
        )
        with staged_output(target, MODULE) as stage:
            shutil.copytree(saved_dir, stage, dirs_exist_ok=True)
            readme = _readme(result, model_dir, owner, slug)
            (stage / README_FILE).write_text(readme, encoding="utf-8")
            metadata = _kaggle_metadata(result, owner, slug, _readme(result, model_dir, owner, slug, for_kaggle=True))
            (stage / KAGGLE_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            marker = {
                "tool": "retrain", "output_kind": MODULE.name, "version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model_dir": str(model_dir.resolve()), "n_module_variables": n_variables,
                **{k: v for k, v in result.to_dict().items() if k not in ("folder_fingerprint", "artifacts", "seconds")},
                "kaggle": {"owner": owner, "slug": slug, "framework": KAGGLE_FRAMEWORK, "variation": KAGGLE_VARIATION,
                           "ignore_patterns": list(DOC_FILES)},
            }
            marker["files"] = manifest(stage, MODULE)
            (stage / MODULE.marker).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    finally:
        remove_stage(scratch)
    result.folder_fingerprint = fingerprint(target)
    result.artifacts = {"module": str(shown), "readme": str(shown / README_FILE),
                        "kaggle_metadata": str(shown / KAGGLE_METADATA_FILE), "record": str(shown / MODULE.marker)}
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _is_url(handle: str) -> bool:
    from ..features.module import is_url

    return is_url(handle)


__all__ = ["ModuleExport", "export_module", "build_reusable_module"]
