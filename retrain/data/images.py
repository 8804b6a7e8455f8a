"""The one preprocessing path: file -> RGB uint8 image of the module's size.

Every consumer (bottleneck cache, evaluation, prediction, int8 calibration) gets its pixels
from ``iter_image_batches``; the serving model applies ``resize_to_uint8`` and
``to_module_input`` inside its graph. So the phone, the cache and training see the same
numbers: decode -> bilinear resize -> round to uint8 -> scale to the module's value range.

Plain JPEG and PNG files are decoded by TensorFlow inside a parallel ``tf.data`` pipeline (no
Python per image). Files TensorFlow gets wrong or cannot read go through Pillow: EXIF-rotated
and CMYK JPEGs, images with transparency (composited on white), GIF (first frame), WebP, BMP,
TIFF, and today's phone formats: AVIF (Pillow's own decoder) and HEIC / HEIF (pillow-heif's
opener, registered with Pillow on first use). A file neither can decode is reported as skipped
with the reason.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .._tf import tf as _tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".avif", ".heic", ".heif")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold, applied to both decoders
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# Bump when the pixels produced for a given file and size change: it is part of the cache key.
PREPROCESSING_VERSION = 2


@dataclass(frozen=True)
class Probe:
    """What the first bytes of a file say about how to decode it."""

    decoder: str  # "tf" or "pillow"
    problem: str | None = None  # set when the file must be skipped without decoding


def probe_image(data: bytes) -> Probe:
    """Choose the decoder for a file's bytes, and refuse files that cannot be images."""
    if not data:
        return Probe("tf", "empty file")
    if data[:3] == b"\xff\xd8\xff":
        return _probe_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _probe_png(data)
    return Probe("pillow")


def _too_large(width: int, height: int) -> str | None:
    if width * height > MAX_PIXELS:
        return f"image too large ({width}x{height} pixels, limit {MAX_PIXELS}): possible decompression bomb"
    return None


def _probe_jpeg(data: bytes) -> Probe:
    pos, exif, components = 2, False, None
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            exif = True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > n:
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            components = data[pos + 9]
            problem = _too_large(width, height)
            if problem:
                return Probe("tf", problem)
            break
        if marker == 0xDA:  # start of scan: no frame header seen
            break
        pos += 2 + length
    if components not in (1, 3):  # CMYK / YCCK, or a header TensorFlow may misread
        return Probe("pillow")
    if exif and _exif_orientation(data) not in (None, 1):
        return Probe("pillow")
    return Probe("tf")


def _exif_orientation(data: bytes) -> int | None:
    from PIL import Image

    register_phone_formats()

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.getexif().get(0x0112)
    except Exception:
        return None


def _probe_png(data: bytes) -> Probe:
    if len(data) < 33:
        return Probe("pillow")
    width, height = struct.unpack(">II", data[16:24])
    problem = _too_large(width, height)
    if problem:
        return Probe("tf", problem)
    color_type = data[25]
    if color_type in (4, 6):  # grey+alpha, RGBA
        return Probe("pillow")
    idat = data.find(b"IDAT")
    trns = data.find(b"tRNS")
    if trns != -1 and (idat == -1 or trns < idat):  # palette or colour-key transparency
        return Probe("pillow")
    return Probe("tf")


def to_rgb(image):
    """A decoded (and oriented) Pillow image as RGB: 16-bit grey scaled to 8 bits, transparent
    pixels composited on white. Shared by decoding and the report's thumbnails."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.uint32)
        sixteen_bit = image.mode.startswith("I;16") or grey.max(initial=0) > 255
        scaled = (grey >> 8) if sixteen_bit else grey
        pixels = np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)
        key = image.info.get("transparency")
        if isinstance(key, int):  # PNG colour key (tRNS): transparent, so white
            pixels[grey == key] = BACKGROUND
        return Image.fromarray(pixels)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        image = canvas
    return image.convert("RGB")


_phone_formats_registered = False


def register_phone_formats() -> None:
    """Teach Pillow HEIC / HEIF (iPhone photos), once per process: pillow-heif's opener."""
    global _phone_formats_registered
    if not _phone_formats_registered:
        import pillow_heif

        pillow_heif.register_heif_opener()
        _phone_formats_registered = True


def decode_with_pillow(data: bytes, orient: bool = True) -> np.ndarray:
    """Decode bytes to an RGB uint8 array with Pillow: orientation applied (unless ``orient`` is
    False), alpha on white."""
    import warnings

    from PIL import Image, ImageOps

    register_phone_formats()

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            problem = _too_large(*image.size)
            if problem:
                raise ValueError(problem)
            image.seek(0)  # first frame of an animation
            image.load()
            return np.asarray(to_rgb(ImageOps.exif_transpose(image) if orient else image), dtype=np.uint8)


def resize_to_uint8(images, height: int, width: int):
    """Bilinear resize of uint8 images ([H,W,3] or [N,H,W,3]) to the module's size, rounded to uint8.

    Part of the serving graph, so it must stay a plain TensorFlow op chain.
    """
    tf = _tf()
    resized = tf.image.resize(tf.cast(images, tf.float32), [height, width], method="bilinear", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def to_module_input(images_uint8, value_range: tuple[float, float]):
    """uint8 pixels -> float32 in the module's value range (TF Hub convention: [0, 1])."""
    tf = _tf()
    low, high = value_range
    return tf.cast(images_uint8, tf.float32) * ((high - low) / 255.0) + low


def _tf_decode(path, height: int, width: int):
    return _tf_decode_bytes(_tf().io.read_file(path), height, width)


def _tf_decode_bytes(data, height: int, width: int):
    tf = _tf()
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    return resize_to_uint8(image, height, width)


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """One file -> uint8 [height, width, 3], through the same decoders as the batch pipeline.

    Raises ValueError with a short reason when the file cannot be used.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    return decode_to_size(data, height, width)


def decode_to_size(data: bytes, height: int, width: int) -> np.ndarray:
    """A file's bytes -> uint8 [height, width, 3]: the batch pipeline's choice of decoder and its
    ops, for callers that read the bytes themselves (the Beam workers read them through Beam's
    file systems). Raises ValueError with a short reason when the bytes cannot be used."""
    probe = probe_image(data)
    if probe.problem:
        raise ValueError(probe.problem)
    if probe.decoder == "tf":
        try:
            return _tf_decode_bytes(data, height, width).numpy()
        except Exception:  # as in the batch pipeline: what TensorFlow cannot decode goes to Pillow
            pass
    return _pillow_resized(data, height, width)


def _pillow_resized(data: bytes, height: int, width: int) -> np.ndarray:
    try:
        pixels = decode_with_pillow(data)
    except Exception as error:  # Pillow's own message says what is wrong with the file
        raise ValueError(_reason(error)) from None
    return resize_to_uint8(pixels, height, width).numpy()


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "cannot identify image file" in text:
        return "not a readable image"
    return text[:200]


def iter_image_batches(
    paths: Sequence[str],
    decoders: Sequence[str],
    height: int,
    width: int,
    batch_size: int,
    *,
    as_tensors: bool = False,
    tensorflow: bool = True,
    parallel_calls: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]]:
    """Yield ``(indices, uint8 batch [n,H,W,3], skipped)`` over ``paths``.

    ``decoders[i]`` is the probe's choice for ``paths[i]``. Indices refer to ``paths``;
    ``skipped`` lists ``(index, reason)`` for files that could not be decoded (the batch can
    then be ``None``). Batches from the TensorFlow pipeline come first, then the Pillow ones.
    With ``as_tensors`` the batches are ``tf.Tensor`` (the pipeline's own, not copied through
    NumPy), for callers that hand them straight to a TensorFlow function.

    The TensorFlow files are decoded by parallel ``tf.data`` calls ahead of the consumer; the
    Pillow files by a thread pool, one batch ahead, so either kind of decoding overlaps the
    caller's work on the previous batch.

    ``parallel_calls``: files decoded at once (default: one per core).

    ``tensorflow=False`` gives the same pixels without importing TensorFlow (``predict`` and
    ``evaluate`` on a .tflite file): every file goes through the thread pool,
    ``decode_as_tensorflow_does`` standing in for TensorFlow's decoder and
    ``resize_bilinear_numpy`` for its resize; batches come in the order of ``paths``.
    """
    if not tensorflow:
        if as_tensors:
            raise ValueError("as_tensors needs TensorFlow")
        from importlib.util import find_spec

        if find_spec("simplejpeg") is None:  # here, not as a skip reason on every JPEG
            raise ImportError("decoding without TensorFlow needs the simplejpeg package")

        def read(index):
            return _read_without_tensorflow(paths[index], decoders[index], height, width)

        yield from _pillow_batches(paths, list(range(len(paths))), height, width, batch_size, False, read)
        return
    tf = _tf()
    tf_indices = [i for i, d in enumerate(decoders) if d == "tf"]
    pillow_indices = [i for i, d in enumerate(decoders) if d != "tf"]
    if tf_indices:
        dataset = tf.data.Dataset.from_tensor_slices(
            (np.asarray(tf_indices, dtype=np.int64), [paths[i] for i in tf_indices])
        )
        # Fixed parallelism, autotuning off: tf.data's autotune thread sleeps with an exponential
        # back-off that the end of the iteration does not cut short, so about every other pass
        # ended 3.4-3.5 s late (the last batch of 2,000 images arriving at 6.9 s, the iterator
        # letting go at 10.4 s). The same decode rate without it (1.1-1.3 s for 2,000 images).
        workers = parallel_calls or os.cpu_count() or 1
        dataset = dataset.map(
            lambda index, path: (index, _tf_decode(path, height, width)),
            num_parallel_calls=workers,
            deterministic=True,
        )
        # A file TensorFlow cannot decode is dropped here and retried with Pillow below.
        dataset = dataset.ignore_errors().batch(batch_size).prefetch(2)
        options = tf.data.Options()
        options.autotune.enabled = False
        if parallel_calls:  # that many threads in all, each op on one (a resize would take every core)
            options.threading.private_threadpool_size = parallel_calls
            options.threading.max_intra_op_parallelism = 1
        dataset = dataset.with_options(options)
        seen = np.zeros(len(paths), dtype=bool)
        for indices, batch in dataset:
            indices = indices.numpy()
            seen[indices] = True
            yield indices, (batch if as_tensors else batch.numpy()), []
        pillow_indices = sorted(pillow_indices + [i for i in tf_indices if not seen[i]])
    yield from _pillow_batches(paths, pillow_indices, height, width, batch_size, as_tensors)


def _pillow_read_resized(path: str, height: int, width: int):
    """One file through Pillow: pixels, or the one-line reason it cannot be used."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        return _pillow_resized(data, height, width), None
    except (OSError, ValueError) as error:
        return None, (str(error) if isinstance(error, ValueError) else _reason(error))


def decode_as_tensorflow_does(data: bytes) -> np.ndarray:
    """The pixels ``tf.io.decode_image(channels=3)`` gives for a file the probe sends to
    TensorFlow (a plain JPEG or PNG), without TensorFlow.

    JPEG: libjpeg-turbo (simplejpeg) with TensorFlow's defaults, the fast integer DCT and fancy
    upsampling; the same pixels on all 3,000 cats_and_dogs_filtered photos, where Pillow's
    accurate DCT differed by up to 4 levels on two thirds of their pixels. PNG is lossless: Pillow's
    pixels, without EXIF orientation (TensorFlow applies none), 16 bits cut to their high byte
    as TensorFlow does."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    return decode_with_pillow(data, orient=False)


def _read_without_tensorflow(path: str, decoder: str, height: int, width: int):
    """One file as the TensorFlow pipeline decodes it, with no TensorFlow: pixels, or the one-line
    reason it cannot be used. As there, a file the probe sent to TensorFlow that its decoder
    refuses is retried with Pillow (orientation applied)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return None, _reason(error)
    pixels = None
    if decoder == "tf":
        try:
            pixels = decode_as_tensorflow_does(data)
        except ImportError:
            raise
        except Exception:  # the pipeline's ignore_errors(): retried with Pillow below
            pixels = None
    if pixels is None:
        try:
            pixels = decode_with_pillow(data)
        except Exception as error:  # Pillow's own message says what is wrong with the file
            return None, _reason(error)
    return resize_bilinear_numpy(pixels, height, width), None


def _pillow_batches(paths, indices, height, width, batch_size, as_tensors, read=None):
    """Batches of ``indices`` decoded in a thread pool; ``read(index)`` -> (pixels, reason),
    by default ``_pillow_read_resized``."""
    if not indices:
        return
    from concurrent.futures import ThreadPoolExecutor

    if read is None:
        def read(index):
            return _pillow_read_resized(paths[index], height, width)

    chunks = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    # Pillow and the resize release the GIL while they work, so threads decode in parallel.
    pool = ThreadPoolExecutor(max_workers=min(batch_size, os.cpu_count() or 1), thread_name_prefix="pillow-decode")

    def submit(chunk):
        return [pool.submit(read, index) for index in chunk]

    try:
        pending = submit(chunks[0])
        for number, chunk in enumerate(chunks):
            futures = pending
            if number + 1 < len(chunks):
                pending = submit(chunks[number + 1])  # decode the next batch while this one is used
            good, pixels, skipped = [], [], []
            for index, future in zip(chunk, futures):
                image, reason = future.result()
                if reason is None:
                    good.append(index)
                    pixels.append(image)
                else:
                    skipped.append((index, reason))
            batch = np.stack(pixels) if pixels else None
            if batch is not None and as_tensors:
                batch = _tf().constant(batch)
            yield np.asarray(good, dtype=np.int64), batch, skipped
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bilinear_axis(out_size: int, in_size: int):
    """Source rows (or columns) and weights along one axis, computed as TensorFlow's CPU kernel
    does (resize_bilinear_op.cc, half-pixel centres), in float32 step by step."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
    return lower, upper, position - floor


def bilinear_float32(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tf.image.resize(float32 image, bilinear, antialias=False)`` of one [H, W, C] image in NumPy.

    The same float32 operations in the same order as TensorFlow's kernel (``top = tl + (tr - tl) * x``,
    ``bottom`` likewise, ``top + (bottom - top) * y``), so the result is the same to the bit, not
    only within rounding: a weighted sum ``a * (1 - w) + b * w`` differed by one level after
    rounding on up to 0.02 % of pixels. The corners are gathered as uint8 from rows seen as
    ``[H, W * C]`` (half the time of gathering float32 pixels: 0.8 ms for 500x375 -> 224x224)."""
    source = np.asarray(image)
    in_height, in_width, channels = source.shape
    y_lower, y_upper, y_lerp = _bilinear_axis(height, in_height)
    x_lower, x_upper, x_lerp = _bilinear_axis(width, in_width)
    flat = source.reshape(in_height, in_width * channels)
    offsets = np.arange(channels)
    left = (x_lower[:, None] * channels + offsets).ravel()
    right = (x_upper[:, None] * channels + offsets).ravel()
    x_lerp = np.repeat(x_lerp, channels)[None, :]
    rows, next_rows = flat[y_lower], flat[y_upper]
    top_left = rows.take(left, axis=1).astype(np.float32)
    top = rows.take(right, axis=1).astype(np.float32)
    top -= top_left
    top *= x_lerp
    top += top_left
    bottom_left = next_rows.take(left, axis=1).astype(np.float32)
    bottom = next_rows.take(right, axis=1).astype(np.float32)
    bottom -= bottom_left
    bottom *= x_lerp
    bottom += bottom_left
    bottom -= top
    bottom *= y_lerp[:, None]
    bottom += top
    return bottom.reshape(height, width, channels)


def resize_bilinear_numpy(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``resize_to_uint8`` in NumPy, for code that runs without TensorFlow (``predict`` and
    ``evaluate`` on a .tflite file, LiteRT apps, the model card's snippet): bilinear with
    half-pixel centres and no antialiasing, as ``tf.image.resize`` computes it, rounded half to
    even (``tf.round``) to uint8. Pillow's BILINEAR is not this: it antialiases when shrinking."""
    return np.clip(np.round(bilinear_float32(image, height, width)), 0, 255).astype(np.uint8)
