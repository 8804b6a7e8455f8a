"""retrain.data.images: probing, decoding (TensorFlow and Pillow) and batching image files.

Every image is made by the test with Pillow, in memory or inside tmp_path.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from retrain.data.images import (
    MAX_PIXELS,
    decode_with_pillow,
    iter_image_batches,
    load_image,
    probe_image,
    resize_to_uint8,
)

H, W = 24, 32  # not square, so a swapped height and width shows


# ----------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(colour, size=(16, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def gradient(width=48, height=40) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def exif_bytes(orientation: int | None, **tags) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    for tag, value in tags.items():
        exif[int(tag[1:])] = value
    return exif.tobytes()


def red_blue(width=40, height=20) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels, "RGB")


def animated_gif(colours) -> bytes:
    frames = [solid(c) for c in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (16, 12), 0)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    image.paste(1, (0, 0, 8, 12))  # left half green, right half index 0 = transparent
    return encode(image, "PNG", transparency=0)


def grey16(value, size=(16, 12)) -> Image.Image:
    return Image.fromarray(np.full(size[::-1], value, np.uint16))


def bomb_png(width=20000, height=20000) -> bytes:
    data = bytearray(encode(solid((1, 2, 3)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


def bomb_jpeg(width=20000, height=20000) -> bytes:
    data = bytearray(encode(solid((1, 2, 3)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(gradient(64, 64), "JPEG", quality=95)
    return data[: len(data) // 2]


FORMATS = {
    # name: (bytes factory, decoder the probe should choose, expected colour of the decoded image or None)
    "rgb_jpeg": (lambda: encode(solid((200, 30, 40)), "JPEG", quality=95), "tf", (200, 30, 40)),
    "progressive_jpeg": (lambda: encode(solid((20, 130, 240)), "JPEG", progressive=True), "tf", (20, 130, 240)),
    "grey_jpeg": (lambda: encode(solid(90, mode="L"), "JPEG"), "tf", (90, 90, 90)),
    "rgb_png": (lambda: encode(solid((10, 200, 30)), "PNG"), "tf", (10, 200, 30)),
    "grey_png": (lambda: encode(solid(77, mode="L"), "PNG"), "tf", (77, 77, 77)),
    "grey16_png": (lambda: encode(grey16(32768), "PNG"), "tf", (128, 128, 128)),
    "palette_png": (lambda: encode(solid((10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "tf", (10, 200, 30)),
    "rgba_png": (lambda: encode(solid((250, 20, 20, 255), mode="RGBA"), "PNG"), "pillow", (250, 20, 20)),
    "grey_alpha_png": (lambda: encode(solid((60, 255), mode="LA"), "PNG"), "pillow", (60, 60, 60)),
    "palette_png_transparent": (palette_png_with_transparency, "pillow", None),
    "rgb_png_colour_key": (lambda: encode(solid((1, 2, 3)), "PNG", transparency=(9, 9, 9)), "pillow", (1, 2, 3)),
    "cmyk_jpeg": (lambda: encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=95), "pillow", (255, 0, 0)),
    "exif6_jpeg": (lambda: encode(solid((30, 60, 90)), "JPEG", quality=95, exif=exif_bytes(6)), "pillow", (30, 60, 90)),
    "exif1_jpeg": (lambda: encode(solid((30, 60, 90)), "JPEG", quality=95, exif=exif_bytes(1)), "tf", (30, 60, 90)),
    "exif_no_orientation_jpeg": (
        lambda: encode(solid((30, 60, 90)), "JPEG", quality=95, exif=exif_bytes(None, t271="Maker")),
        "tf",
        (30, 60, 90),
    ),
    "gif": (lambda: encode(solid((255, 255, 0)), "GIF"), "pillow", (255, 255, 0)),
    "animated_gif": (lambda: animated_gif([(255, 0, 0), (0, 0, 255), (0, 255, 0)]), "pillow", (255, 0, 0)),
    "webp": (lambda: encode(solid((0, 120, 250)), "WEBP", lossless=True), "pillow", (0, 120, 250)),
    "lossy_webp": (lambda: encode(solid((0, 120, 250)), "WEBP", quality=90), "pillow", (0, 120, 250)),
    "bmp": (lambda: encode(solid((123, 45, 67)), "BMP"), "pillow", (123, 45, 67)),
    "one_pixel_png": (lambda: encode(solid((5, 6, 7), size=(1, 1)), "PNG"), "tf", (5, 6, 7)),
    "one_pixel_jpeg": (lambda: encode(solid((128, 128, 128), size=(1, 1)), "JPEG"), "tf", (128, 128, 128)),
}


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def assert_colour(pixels: np.ndarray, colour, tolerance: int):
    difference = np.abs(pixels.astype(int) - np.asarray(colour, int)).max()
    assert difference <= tolerance, (pixels.reshape(-1, 3)[:3].tolist(), colour)


# ----------------------------------------------------------------------------- probe_image


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_probe_routes_each_format_to_its_decoder(name):
    factory, decoder, _ = FORMATS[name]
    probe = probe_image(factory())
    assert probe.decoder == decoder
    assert probe.problem is None


def test_probe_empty_bytes_is_an_empty_file():
    assert probe_image(b"").problem == "empty file"


def test_probe_other_bytes_go_to_pillow_without_a_problem():
    # the probe only refuses what it can tell from the header; Pillow reports the rest
    assert probe_image(b"hello, world").decoder == "pillow"
    assert probe_image(b"hello, world").problem is None


@pytest.mark.parametrize("factory", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_probe_refuses_a_header_claiming_a_huge_image(factory):
    problem = probe_image(factory()).problem
    assert problem == f"image too large (20000x20000 pixels, limit {MAX_PIXELS}): possible decompression bomb"


@pytest.mark.parametrize("factory", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_probe_accepts_a_header_just_under_the_limit(factory):
    assert probe_image(factory(9000, 9000)).problem is None  # 81 M pixels < 89.5 M
    assert "decompression bomb" in probe_image(factory(9500, 9500)).problem  # 90.25 M


def test_probe_png_truncated_before_end_of_header_goes_to_pillow():
    data = encode(solid((1, 2, 3)), "PNG")[:30]
    assert probe_image(data).decoder == "pillow"
    assert probe_image(data).problem is None


def test_probe_jpeg_without_frame_header_goes_to_pillow():
    assert probe_image(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00").decoder == "pillow"
    assert probe_image(b"\xff\xd8\xff" + bytes(100)).decoder == "pillow"


# ----------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("name", sorted(n for n in FORMATS if FORMATS[n][2] is not None))
def test_load_image_gives_uint8_rgb_of_the_requested_size(tmp_path, name):
    factory, _, colour = FORMATS[name]
    pixels = load_image(write(tmp_path, f"{name}.img", factory()), H, W)
    assert pixels.shape == (H, W, 3)
    assert pixels.dtype == np.uint8
    lossy = name in ("rgb_jpeg", "progressive_jpeg", "grey_jpeg", "cmyk_jpeg", "exif6_jpeg", "exif1_jpeg",
                     "exif_no_orientation_jpeg", "lossy_webp", "one_pixel_jpeg")
    assert_colour(pixels, colour, 6 if lossy else 1)


def test_load_image_composites_transparent_pixels_on_white(tmp_path):
    rgba = np.zeros((12, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    half = load_image(write(tmp_path, "half.png", encode(Image.fromarray(rgba, "RGBA"), "PNG")), 12, 16)
    assert_colour(half[:, :7], (255, 0, 0), 0)
    assert_colour(half[:, 9:], (255, 255, 255), 0)
    clear = load_image(write(tmp_path, "clear.png", encode(solid((0, 0, 0, 0), mode="RGBA"), "PNG")), H, W)
    assert_colour(clear, (255, 255, 255), 0)
    semi = load_image(write(tmp_path, "semi.png", encode(solid((0, 0, 0, 128), mode="RGBA"), "PNG")), H, W)
    assert_colour(semi, (127, 127, 127), 1)


def test_load_image_palette_transparency_is_white(tmp_path):
    pixels = load_image(write(tmp_path, "p.png", palette_png_with_transparency()), 12, 16)
    assert_colour(pixels[:, :7], (0, 200, 0), 0)
    assert_colour(pixels[:, 9:], (255, 255, 255), 0)


def test_load_image_colour_key_transparency_is_white(tmp_path):
    """PNG tRNS on an RGB or grey image: the keyed colour is transparent."""
    image = solid((10, 20, 30))
    image.paste((200, 0, 0), (0, 0, 8, 12))
    rgb = load_image(write(tmp_path, "rgb.png", encode(image, "PNG", transparency=(10, 20, 30))), 12, 16)
    assert_colour(rgb[:, :7], (200, 0, 0), 0)
    assert_colour(rgb[:, 9:], (255, 255, 255), 0)
    grey = solid(10, mode="L")
    grey.paste(200, (0, 0, 8, 12))
    grey_pixels = load_image(write(tmp_path, "grey.png", encode(grey, "PNG", transparency=10)), 12, 16)
    assert_colour(grey_pixels[:, :7], (200, 200, 200), 0)
    assert_colour(grey_pixels[:, 9:], (255, 255, 255), 0)


def test_load_image_gif_transparency_is_white(tmp_path):
    image = Image.new("P", (16, 12), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.paste(0, (8, 0, 16, 12))
    pixels = load_image(write(tmp_path, "t.gif", encode(image, "GIF", transparency=0)), 12, 16)
    assert_colour(pixels[:, :7], (0, 0, 255), 0)
    assert_colour(pixels[:, 9:], (255, 255, 255), 0)


def test_load_image_scales_16_bit_grey(tmp_path):
    ramp = np.tile(np.array([0, 256, 32768, 65535], np.uint16).repeat(4), (3, 1))  # 16 wide, 3 high
    pixels = load_image(write(tmp_path, "ramp16.png", encode(Image.fromarray(ramp), "PNG")), 3, 16)
    assert pixels[0, ::4, 0].tolist() == pytest.approx([0, 1, 128, 255], abs=1)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    dark = load_image(write(tmp_path, "dark16.png", encode(grey16(200), "PNG")), H, W)
    assert_colour(dark, (1, 1, 1), 1)  # 200 / 65535 is black, not grey 200


def test_decode_with_pillow_scales_16_bit_grey_like_tensorflow():
    for value, expected in ((0, 0), (200, 1), (255, 1), (32768, 128), (65535, 255)):
        pixels = decode_with_pillow(encode(grey16(value), "PNG"))
        assert pixels.shape == (12, 16, 3) and pixels.dtype == np.uint8
        assert abs(int(pixels[0, 0, 0]) - expected) <= 1, (value, pixels[0, 0].tolist())


def test_load_image_16_bit_grey_with_colour_key(tmp_path):
    """tRNS sends a 16-bit grey PNG to Pillow: values are still scaled, the key is white."""
    ramp = np.full((12, 16), 32768, np.uint16)
    ramp[:, 8:] = 7
    data = encode(Image.fromarray(ramp), "PNG", transparency=7)
    assert probe_image(data).decoder == "pillow"
    pixels = load_image(write(tmp_path, "key16.png", data), 12, 16)
    assert_colour(pixels[:, :7], (128, 128, 128), 1)
    assert_colour(pixels[:, 9:], (255, 255, 255), 0)


def test_load_image_animated_gif_uses_the_first_frame(tmp_path):
    path = write(tmp_path, "anim.gif", animated_gif([(0, 0, 255), (255, 0, 0)]))
    with Image.open(path) as image:
        assert image.n_frames == 2
    assert_colour(load_image(path, H, W), (0, 0, 255), 0)


def test_load_image_applies_exif_orientation(tmp_path):
    data = encode(red_blue(40, 20), "JPEG", quality=95, exif=exif_bytes(6))
    assert probe_image(data).decoder == "pillow"
    path = write(tmp_path, "rotated.jpg", data)
    pixels = load_image(path, 40, 20)  # displayed: 20 wide, 40 tall
    # rotated 90 degrees clockwise for display: the left (red) half is now on top
    assert_colour(pixels[2:18], (255, 0, 0), 12)
    assert_colour(pixels[22:38], (0, 0, 255), 12)
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert shown.shape == (40, 20, 3)
    expected = resize_to_uint8(shown, 40, 20).numpy()
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2
    # and at another output size the same picture, resized
    small = load_image(path, 8, 6)
    assert_colour(small[:3], (255, 0, 0), 12)
    assert_colour(small[5:], (0, 0, 255), 12)


@pytest.mark.parametrize("orientation, top_left", [(3, (0, 0, 255)), (8, (0, 0, 255)), (1, (255, 0, 0))])
def test_load_image_other_orientations(tmp_path, orientation, top_left):
    data = encode(red_blue(40, 20), "JPEG", quality=95, exif=exif_bytes(orientation))
    path = write(tmp_path, f"o{orientation}.jpg", data)
    height, width = (20, 40) if orientation in (1, 3) else (40, 20)
    pixels = load_image(path, height, width)
    assert_colour(pixels[:4, :4], top_left, 12)
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.abs(pixels.astype(int) - shown.astype(int)).max() <= 12


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("random.jpg", np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a readable image"),
        ("text.png", b"this is not a picture\n" * 10, "not a readable image"),
        ("fake.jpg", b"\xff\xd8\xff" + b"garbage" * 30, "not a readable image"),
        ("empty.jpg", b"", "empty file"),
    ],
)
def test_load_image_rejects_non_images_with_a_short_reason(tmp_path, name, data, reason):
    with pytest.raises(ValueError) as info:
        load_image(write(tmp_path, name, data), H, W)
    assert str(info.value) == reason


def test_load_image_rejects_truncated_jpeg(tmp_path):
    data = truncated_jpeg()
    assert probe_image(data).decoder == "tf"
    with pytest.raises(ValueError) as info:
        load_image(write(tmp_path, "cut.jpg", data), H, W)
    message = str(info.value)
    assert "truncated" in message.lower()
    assert "\n" not in message and len(message) <= 200


@pytest.mark.parametrize(
    "name, data",
    [
        ("bomb.png", bomb_png()),
        ("bomb.jpg", bomb_jpeg()),
        # a GIF goes to Pillow: its own check must hold there too
        ("bomb.gif", (lambda d: d[:6] + struct.pack("<HH", 20000, 20000) + d[10:])(encode(solid((1, 2, 3)), "GIF"))),
    ],
)
def test_load_image_rejects_decompression_bombs(tmp_path, name, data):
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(write(tmp_path, name, data), H, W)


def test_load_image_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        load_image(str(tmp_path / "missing.jpg"), H, W)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_tensorflow_and_pillow_decoders_agree(tmp_path, fmt):
    data = encode(gradient(), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert probe_image(data).decoder == "tf"
    by_tf = load_image(write(tmp_path, f"g.{fmt.lower()}", data), H, W).astype(float)
    by_pillow = resize_to_uint8(decode_with_pillow(data), H, W).numpy().astype(float)
    assert by_pillow.shape == (H, W, 3)
    assert np.abs(by_tf - by_pillow).mean() < 2
    if fmt == "PNG":
        assert np.array_equal(by_tf, by_pillow)  # lossless: exactly the same pixels


def test_resize_to_uint8_handles_single_images_and_batches():
    image = np.asarray(gradient(), np.uint8)
    single = resize_to_uint8(image, H, W).numpy()
    batch = resize_to_uint8(np.stack([image, image[::-1]]), H, W).numpy()
    assert single.shape == (H, W, 3) and single.dtype == np.uint8
    assert batch.shape == (2, H, W, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], single)
    same = resize_to_uint8(image, 40, 48).numpy()
    assert np.array_equal(same, image)  # same size: unchanged


# ----------------------------------------------------------------------------- iter_image_batches


MIXED = [
    # (file name, bytes, expected colour or the skip reason)
    ("0.jpg", lambda: encode(solid((200, 30, 40)), "JPEG", quality=95), (200, 30, 40)),
    ("1.png", lambda: encode(solid((20, 220, 20, 255), mode="RGBA"), "PNG"), (20, 220, 20)),
    ("2.png", lambda: encode(solid((0, 0, 250)), "PNG"), (0, 0, 250)),
    ("3.jpg", truncated_jpeg, "truncated"),
    ("4.png", lambda: b"not a png at all\n", "not a readable image"),
    ("5.gif", lambda: animated_gif([(255, 255, 0), (0, 0, 0)]), (255, 255, 0)),
    ("6.png", lambda: encode(solid((255, 0, 255)), "PNG"), (255, 0, 255)),
    ("7.jpg", lambda: np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes(), "not a readable image"),
    ("8.jpg", lambda: encode(solid((30, 60, 90)), "JPEG", quality=95, exif=exif_bytes(6)), (30, 60, 90)),
    ("9.bmp", lambda: encode(solid(1, mode="1"), "BMP"), (255, 255, 255)),  # TensorFlow cannot read 1-bit BMP
    ("10.webp", lambda: encode(solid((0, 120, 250)), "WEBP", lossless=True), (0, 120, 250)),
    ("11.png", lambda: encode(grey16(65535), "PNG"), (255, 255, 255)),
]


@pytest.fixture
def mixed_files(tmp_path):
    paths = [write(tmp_path, name, factory()) for name, factory, _ in MIXED]
    decoders = [probe_image(factory()).decoder for _, factory, _ in MIXED]
    return paths, decoders


def collect(paths, decoders, batch_size, height=H, width=W):
    order, pixels, skipped, batches = [], {}, {}, []
    for indices, batch, skips in iter_image_batches(paths, decoders, height, width, batch_size):
        batches.append((indices, batch, skips))
        assert indices.dtype == np.int64
        if batch is None:
            assert len(indices) == 0 and skips
        else:
            assert batch.dtype == np.uint8
            assert batch.shape == (len(indices), height, width, 3)
            assert 1 <= len(indices) <= batch_size
        for position, index in enumerate(indices.tolist()):
            assert index not in pixels, f"index {index} yielded twice"
            pixels[index] = batch[position]
            order.append(index)
        for index, reason in skips:
            assert index not in skipped, f"index {index} skipped twice"
            skipped[index] = reason
        assert len(indices) + len(skips) <= batch_size
    return order, pixels, skipped, batches


@pytest.mark.parametrize("batch_size", [1, 2, 5, 100])
def test_iter_image_batches_covers_every_file_once(mixed_files, batch_size):
    paths, decoders = mixed_files
    assert decoders == ["tf", "pillow", "tf", "tf", "pillow", "pillow", "tf", "pillow", "pillow", "pillow",
                        "pillow", "tf"]
    decoders = list(decoders)
    decoders[9] = "tf"  # as if the probe had chosen TensorFlow for a file it cannot read
    order, pixels, skipped, _ = collect(paths, decoders, batch_size)
    good = [i for i, (_, _, expected) in enumerate(MIXED) if not isinstance(expected, str)]
    assert sorted(pixels) == good
    assert set(skipped) == {3, 4, 7}
    assert set(pixels).isdisjoint(skipped)
    for index, (name, _, expected) in enumerate(MIXED):
        if isinstance(expected, str):
            assert expected in skipped[index].lower(), (name, skipped[index])
            assert "\n" not in skipped[index] and len(skipped[index]) <= 200
        else:
            lossy = name.endswith(".jpg")
            assert_colour(pixels[index], expected, 6 if lossy else 0)
    # TensorFlow's batches come first (in order), then Pillow's, with the files TF failed on
    assert order == [0, 2, 6, 11, 1, 5, 8, 9, 10]


def test_iter_image_batches_truncated_jpeg_falls_back_to_pillow_and_is_skipped(tmp_path):
    paths = [write(tmp_path, "ok.jpg", encode(solid((9, 9, 9)), "JPEG")), write(tmp_path, "cut.jpg", truncated_jpeg())]
    order, pixels, skipped, batches = collect(paths, ["tf", "tf"], 8)
    assert order == [0]
    assert list(skipped) == [1] and "truncated" in skipped[1].lower()
    assert len(batches) == 2  # the TF batch, then the Pillow retry that yields no pixels
    assert batches[1][1] is None and batches[1][0].tolist() == []


def test_iter_image_batches_only_tensorflow_files(tmp_path):
    colours = [(i * 40, 255 - i * 40, 7) for i in range(5)]
    paths = [write(tmp_path, f"{i}.png", encode(solid(c), "PNG")) for i, c in enumerate(colours)]
    order, pixels, skipped, batches = collect(paths, ["tf"] * 5, 2)
    assert order == [0, 1, 2, 3, 4]
    assert skipped == {}
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    for index, colour in enumerate(colours):
        assert_colour(pixels[index], colour, 0)


def test_iter_image_batches_only_pillow_files(tmp_path):
    colours = [(i * 40, 7, 255 - i * 40) for i in range(3)]
    paths = [write(tmp_path, f"{i}.bmp", encode(solid(c), "BMP")) for i, c in enumerate(colours)]
    order, pixels, skipped, batches = collect(paths, ["pillow"] * 3, 2, height=5, width=3)
    assert order == [0, 1, 2]
    assert [len(b[0]) for b in batches] == [2, 1]
    for index, colour in enumerate(colours):
        assert_colour(pixels[index], colour, 0)


def test_iter_image_batches_nothing_to_do():
    assert list(iter_image_batches([], [], H, W, 4)) == []


def test_iter_image_batches_matches_load_image(mixed_files):
    paths, decoders = mixed_files
    _, pixels, _, _ = collect(paths, decoders, 4)
    for index, image in pixels.items():
        assert np.array_equal(image, load_image(paths[index], H, W)), paths[index]


def test_iter_image_batches_reports_a_file_that_vanished(tmp_path):
    paths = [write(tmp_path, "a.bmp", encode(solid((1, 2, 3)), "BMP")), str(tmp_path / "gone.bmp")]
    _, pixels, skipped, _ = collect(paths, ["pillow", "pillow"], 4)
    assert list(pixels) == [0]
    assert list(skipped) == [1] and skipped[1]


def test_iter_image_batches_as_tensors_gives_the_same_pixels(mixed_files):
    paths, decoders = mixed_files
    _, expected, expected_skipped, _ = collect(paths, decoders, 4)
    seen, skipped = {}, {}
    for indices, batch, skips in iter_image_batches(paths, decoders, H, W, 4, as_tensors=True):
        if batch is not None:
            assert not isinstance(batch, np.ndarray) and batch.dtype.name == "uint8"
            for position, index in enumerate(indices.tolist()):
                seen[index] = batch[position].numpy()
        skipped.update(skips)
    assert sorted(seen) == sorted(expected) and skipped == expected_skipped
    for index, pixels in seen.items():
        assert np.array_equal(pixels, expected[index])


def test_iter_image_batches_pillow_files_over_many_batches_keep_their_order(tmp_path):
    colours = [(i * 9, 255 - i * 9, i * 3) for i in range(23)]
    paths = [write(tmp_path, f"{i}.bmp", encode(solid(c), "BMP")) for i, c in enumerate(colours)]
    paths.insert(7, str(tmp_path / "missing.bmp"))
    order, pixels, skipped, batches = collect(paths, ["pillow"] * len(paths), 4)
    assert order == [i for i in range(len(paths)) if i != 7]
    assert list(skipped) == [7]
    assert [len(b[0]) + len(b[2]) for b in batches] == [4] * 6
    for index, colour in enumerate(colours):
        assert_colour(pixels[index if index < 7 else index + 1], colour, 0)


def test_iter_image_batches_stopped_early_leaves_no_decoder_running(tmp_path):
    import threading

    paths = [write(tmp_path, f"{i}.bmp", encode(solid((i, i, i)), "BMP")) for i in range(40)]
    batches = iter_image_batches(paths, ["pillow"] * 40, H, W, 4)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("pillow-decode")]
