"""The model card, OUT/README.md: what made the model, how good each file is, how to run it."""

from __future__ import annotations

from ..serving.tflite import TFLITE_FORMATS


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _with_interval(figures: dict) -> str:
    interval = figures.get("accuracy_interval")
    if not interval:
        return f"{_pct(figures['accuracy'])} ({figures.get('n_images', '?')} images)"
    return (f"{_pct(figures['accuracy'])} (95% interval {_pct(interval[0])}-{_pct(interval[1])}, "
            f"{figures['n_images']} images)")


def _training_lines(run: dict) -> list[str]:
    config, lines = run["config"], []
    head = run.get("head", {})
    cv = head.get("cross_validation")
    if head.get("solver") == "logistic" and cv:
        chosen = (f"L2 strength C={cv['c']:g} chosen by {cv['folds']}-fold cross-validation" if cv.get("folds")
                  else f"L2 strength C={cv['c']:g} (too few images to cross-validate)")
        folded = f"; {head['validation_folded']} validation images folded into training" if head.get("validation_folded") else ""
        lines.append(f"- head: logistic regression (L-BFGS, to convergence), {chosen}{folded}")
    else:
        lines.append(f"- head: minibatch, {head.get('epochs_run', '?')} epoch(s), best epoch {head.get('best_epoch', '?')}, "
                     f"{config['optimizer']} learning rate {config['learning_rate']:g}")
    balance = run.get("class_balance")
    if balance:
        counts = balance["class_counts"]
        lines.append(f"- class balance: {min(counts.values())}-{max(counts.values())} training images per class "
                     f"(imbalance ratio {balance['imbalance_ratio']:.2f}); class weights: {balance['class_weight']}")
    augment = run.get("augment")
    if augment:
        settings = augment["settings"]
        lines.append(f"- augmentation (training only): flip {'on' if settings['flip'] else 'off'}, crop side "
                     f"{settings['min_crop']:g}-1, brightness +-{settings['brightness']:g}, contrast +-{settings['contrast']:g}; "
                     f"{augment['copies']} cached augmented copies per image for the head"
                     + ("; on the fly while fine-tuning" if augment.get("on_the_fly") else ""))
    fine = run.get("fine_tune")
    if fine:
        frozen, best = fine["frozen_validation"], fine["best_validation"]
        if fine["weights_changed"]:
            lines.append(f"- fine-tuning: {fine['epochs_run']} epoch(s) at learning rate {fine['learning_rate']:g}, batch "
                         f"norm statistics frozen; best epoch {fine['best_epoch']}: validation accuracy "
                         f"{_pct(frozen['accuracy'])} -> {_pct(best['accuracy'])}, loss {frozen['loss']:.4f} -> {best['loss']:.4f}")
        else:
            lines.append(f"- fine-tuning: {fine['epochs_run']} epoch(s) at learning rate {fine['learning_rate']:g} did not "
                         f"beat the frozen module on validation (accuracy {_pct(frozen['accuracy'])}, loss "
                         f"{frozen['loss']:.4f}): its weights were kept")
    return lines


def model_card(run: dict, metrics: dict) -> str:
    """The output folder's README.md: what made the model, on what, how well, and how to run it."""
    module = run["module"]
    spec = module["input_spec"]
    fine_tuned = module.get("weights_changed", False)
    lines = (_module_lines(run, fine_tuned) + ["", "## Training", ""] + _training_lines(run)
             + _class_lines(run) + _metric_lines(metrics, fine_tuned)
             + _io_lines(spec["height"], spec["width"], len(run["classes"]))
             + _snippet_lines(spec["height"], spec["width"]))
    return "\n".join(lines)


def _module_lines(run: dict, fine_tuned: bool) -> list[str]:
    module = run["module"]
    spec = module["input_spec"]
    height, width = spec["height"], spec["width"]
    made = ("a new softmax head on an image module, then the module's weights fine-tuned with it" if fine_tuned
            else "a new softmax head on a frozen image module")
    lines = [
        "# Image classifier",
        "",
        f"Made by `retrain` {run['versions'].get('retrain', '')} on {run['created']}: {made}, "
        f"trained on `{run['image_dir']}`.",
        "",
        "## Module",
        "",
        f"- handle: `{module['handle']}`",
        f"- fingerprint (SHA-256 of its files): `{module['fingerprint']}`",
        f"- input: {height}x{width} RGB, values scaled to [{spec['value_range'][0]:g}, {spec['value_range'][1]:g}]"
        f"; feature vector of {module['feature_dim']} values",
    ]
    if fine_tuned:
        lines.append(f"- weights: fine-tuned here, so they differ from the module's files; SHA-256 of the exported "
                     f"weights: `{module['weights_fingerprint']}`")
    return lines


def _class_lines(run: dict) -> list[str]:
    classes = run["classes"]
    lines = [
        "",
        f"## Classes ({len(classes)})",
        "",
        "| index | class | train | validation | test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for index, name in enumerate(classes):
        counts = run["split_per_class"].get(name, {})
        lines.append(f"| {index} | {name} | {counts.get('train', 0)} | {counts.get('validation', 0)} | {counts.get('test', 0)} |")
    lines += ["", f"Split (stable, by file-name hash): {run['split']['train']} train, {run['split']['validation']} validation, "
              f"{run['split']['test']} test images."]
    return lines


def _metric_lines(metrics: dict, fine_tuned: bool) -> list[str]:
    lines = ["", "## Metrics", ""]
    if "cross_validation" in metrics:
        cv = metrics["cross_validation"]
        lines.append(f"- cross-validated accuracy ({cv['folds']} folds on the training images): {_with_interval(cv)}")
    if "validation" in metrics:
        source = "fine-tuned network" if fine_tuned else "head on cached features"
        lines.append(f"- validation accuracy ({source}): {_with_interval(metrics['validation'])}")
    if "test" in metrics:
        test_source = "fine-tuned network" if fine_tuned else "head on cached features, as the SavedModel computes it"
        lines.append(f"- test accuracy ({test_source}): {_with_interval(metrics['test'])}")
    if metrics.get("tflite"):
        lines += ["", "| file | format | size | test accuracy | agrees with the trained model | latency (1 thread) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in metrics["tflite"].items():
            lines.append(f"| `{row['file']}` | {TFLITE_FORMATS[name].description} | {row['size_bytes'] / 1e6:.2f} MB | "
                         f"{_pct(row['accuracy'])} | {_pct(row['agreement'])} | {row['ms_per_image']:.2f} ms |")
    return lines


def _io_lines(height: int, width: int, n_classes: int) -> list[str]:
    return [
        "",
        "## Input and output",
        "",
        f"- SavedModel `saved_model/`, signature `serving_default`: `images` uint8 `[batch, height, width, 3]` RGB of any "
        "size (resized inside the model, bilinear, exactly as in training) -> `probabilities` float32 `[batch, "
        f"{n_classes}]` in `labels.txt` order. Signature `serving_fixed` takes images already resized to {height}x{width}.",
        "- Signature `serving_bytes` (for servers): `image_bytes` string `[batch]`, encoded JPEG, PNG, GIF or BMP files -> "
        f"`probabilities` `[batch, {n_classes}]`, `classes` (the top {min(5, n_classes)} class names, best first) and "
        "`scores` (their probabilities). Files are decoded as in training: EXIF orientation applied (a photo taken "
        "sideways is seen upright), transparency on white, grey to RGB; then the same resize.",
        f"- TFLite files: input uint8 `[1, {height}, {width}, 3]` RGB; the app resizes the image to {height}x{width} "
        "(bilinear with half-pixel centres and no antialiasing, as `tf.image.resize`; no crop, aspect ratio not kept) "
        "before calling the model, as the snippet below does. Output: probabilities `[1, "
        f"{n_classes}]` (float32; uint8 with scale 1/256 in the int8-full file). The labels are inside each file "
        "(TFLite metadata, output tensor associated file `labels.txt`) and beside it in `labels.txt`.",
        "",
    ]


def _server_snippet_lines() -> list[str]:
    """``serving_bytes`` from Python, and one TF Serving REST request."""
    return [
        "Encoded files in, as a server takes them (`serving_bytes`):",
        "",
        "```python",
        "import tensorflow as tf",
        "",
        'model = tf.saved_model.load("saved_model")',
        'files = tf.constant([open("photo.jpg", "rb").read()])',
        'result = model.signatures["serving_bytes"](image_bytes=files)',
        'print(result["classes"][0, 0].numpy().decode(), float(result["scores"][0, 0]))',
        "```",
        "",
        "TF Serving (REST; the model folder needs a version number), then one request:",
        "",
        "```sh",
        "mkdir -p served/classifier && cp -r saved_model served/classifier/1",
        'docker run -p 8501:8501 -v "$PWD/served/classifier:/models/classifier" -e MODEL_NAME=classifier tensorflow/serving',
        'curl -s localhost:8501/v1/models/classifier:predict -d "{\\"signature_name\\": \\"serving_bytes\\", '
        '\\"instances\\": [{\\"image_bytes\\": {\\"b64\\": \\"$(base64 -w0 photo.jpg)\\"}}]}"',
        "```",
        "",
        'The answer is `{"predictions": [{"probabilities": [...], "classes": [...], "scores": [...]}]}`.',
        "",
    ]


def _snippet_lines(height: int, width: int) -> list[str]:
    return [
        "## Run it",
        "",
        "Python (SavedModel):",
        "",
        "```python",
        "import numpy as np, tensorflow as tf",
        "from PIL import Image, ImageOps",
        "",
        'model = tf.saved_model.load("saved_model")',
        'labels = open("labels.txt").read().splitlines()',
        'image = np.asarray(ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB"))[None]',
        'probabilities = model.signatures["serving_default"](images=tf.constant(image))["probabilities"][0].numpy()',
        "print(labels[int(probabilities.argmax())], float(probabilities.max()))",
        "```",
        "",
        *_server_snippet_lines(),
        "LiteRT (`pip install ai-edge-litert`):",
        "",
        "```python",
        "import numpy as np",
        "from PIL import Image, ImageOps",
        "from ai_edge_litert.interpreter import Interpreter",
        "",
        "def resize(image, height, width):  # bilinear, half-pixel centres, no antialiasing: as in training",
        "    image = np.asarray(image, np.float32)",
        "    ys = np.clip((np.arange(height) + 0.5) * image.shape[0] / height - 0.5, 0, image.shape[0] - 1)",
        "    xs = np.clip((np.arange(width) + 0.5) * image.shape[1] / width - 0.5, 0, image.shape[1] - 1)",
        "    y0, x0 = ys.astype(int), xs.astype(int)",
        "    y1, x1 = np.minimum(y0 + 1, image.shape[0] - 1), np.minimum(x0 + 1, image.shape[1] - 1)",
        "    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]",
        "    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx",
        "    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx",
        "    return np.clip(np.round(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)",
        "",
        'interpreter = Interpreter(model_path="model.tflite")',
        "interpreter.allocate_tensors()",
        "inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]",
        'labels = open("labels.txt").read().splitlines()',
        'image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")',
        f'interpreter.set_tensor(inp["index"], resize(image, {height}, {width})[None])',
        "interpreter.invoke()",
        'scores = interpreter.get_tensor(out["index"])[0].astype(np.float32)',
        'if out["dtype"] != np.float32:  # int8-full file: dequantize',
        '    scale, zero_point = out["quantization"]',
        "    scores = (scores - zero_point) * scale",
        "print(labels[int(scores.argmax())], float(scores.max()))",
        "```",
        "",
        "Command line: `retrain predict . photo.jpg --top-k 3`, `retrain evaluate model.tflite held_out/ --report report/`.",
        "",
        "Full configuration, package versions and skipped files: `run.json`; all figures: `metrics.json`.",
        "",
    ]
