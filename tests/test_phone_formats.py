"""Photos straight from today's phones (HEIC / HEIF, AVIF) and TIFF decode like any other image."""

import numpy as np
import pytest
from PIL import Image

from retrain.data.dataset import scan_folder
from retrain.data.images import decode_with_pillow, probe_image

COLOUR = (200, 60, 30)


def _save(path, fmt):
    picture = Image.new("RGB", (40, 30), COLOUR)
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_pillow(picture).save(str(path), quality=95)
    else:
        picture.save(path, fmt, **({"quality": 95} if fmt == "AVIF" else {}))
    return path


@pytest.mark.parametrize("suffix, fmt", [(".heic", "HEIF"), (".heif", "HEIF"), (".avif", "AVIF"), (".tif", "TIFF"),
                                         (".tiff", "TIFF")])
def test_phone_and_tiff_photos_decode_to_their_colour(tmp_path, suffix, fmt):
    path = _save(tmp_path / f"photo{suffix}", fmt)
    data = path.read_bytes()
    assert probe_image(data).problem is None
    pixels = decode_with_pillow(data)
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - COLOUR).mean() < 6  # lossy codecs: within a few levels


def test_a_folder_of_phone_photos_is_scanned_without_skips(tmp_path):
    for name in ("a", "b"):
        for index, (suffix, fmt) in enumerate([(".heic", "HEIF"), (".avif", "AVIF"), (".tiff", "TIFF")]):
            folder = tmp_path / name
            folder.mkdir(exist_ok=True)
            picture = Image.new("RGB", (40, 30), (index * 60 + (name == "b") * 30, 90, 120))
            if fmt == "HEIF":
                import pillow_heif

                pillow_heif.from_pillow(picture).save(str(folder / f"{index}{suffix}"))
            else:
                picture.save(folder / f"{index}{suffix}", fmt)
    scan = scan_folder(tmp_path)
    assert len(scan.images) == 6 and scan.skipped == []
    assert {image.decoder for image in scan.images} == {"pillow"}
