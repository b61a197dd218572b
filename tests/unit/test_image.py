import io

import cv2
import numpy as np
import pytest
from PIL import Image

from common.errors import UndecodableImage
from avatar_model.media.image import bucket_size, load_image, resize_to_bucket


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:20, :30] = (255, 0, 0)  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)

    image = load_image(data)

    assert image.shape == (60, 40, 3)
    assert image[5, -5, 0] > 200 and image[5, -5, 1] < 60  # the red corner is now top-right
    assert image[-5, 5].max() < 60


def test_rgba_is_composited_over_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 4:] = (0, 0, 255, 0)  # fully transparent
    image = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert tuple(image[0, 0]) == (0, 0, 255)
    assert tuple(image[0, 7]) == (255, 255, 255)


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    image = load_image(encode(palette, "PNG", transparency=0))
    assert tuple(image[0, 0]) == (255, 0, 0)
    assert tuple(image[3, 3]) == (255, 255, 255)


def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    image = load_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert image.shape == (4, 16, 3)
    np.testing.assert_array_equal(image[..., 0], gray)
    np.testing.assert_array_equal(image[..., 2], gray)


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(encode(cmyk, "JPEG", quality=95))
    red, green, blue = image[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_16bit_grayscale_png_is_rescaled_not_clipped():
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    ok, png = cv2.imencode(".png", levels)
    assert ok
    image = load_image(png.tobytes())
    np.testing.assert_array_equal(image[0, :, 0], [0, 64, 128, 255])


def test_16bit_rgb_png_decodes():
    bgr = np.zeros((4, 4, 3), dtype=np.uint16)
    bgr[..., 2] = 65535  # red, in OpenCV's BGR order
    bgr[..., 1] = 257 * 100
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    image = load_image(png.tobytes())
    assert image.dtype == np.uint8
    assert tuple(image[0, 0]) == (255, 100, 0)


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_undecodable_image_names_the_item(data):
    with pytest.raises(UndecodableImage, match=r"^item-7\.png: cannot decode image"):
        load_image(data, "item-7.png")


def test_truncated_jpeg_is_undecodable():
    data = encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(UndecodableImage):
        load_image(data[: len(data) // 3], "cut.jpg")


@pytest.mark.parametrize(
    ("width", "height", "short_side", "expected"),
    [
        (512, 512, 704, (704, 704)),
        (1920, 1080, 704, (1216, 704)),
        (1080, 1920, 704, (704, 1216)),
        (512, 512, 512, (512, 512)),
        (384, 480, 512, (512, 640)),
        (1920, 1080, 512, (832, 448)),
    ],
)
def test_bucket_size_examples(width, height, short_side, expected):
    assert bucket_size(width, height, short_side) == expected


@pytest.mark.parametrize("short_side", [256, 384, 512, 704, 320])
@pytest.mark.parametrize(("width", "height"), [(100, 100), (4000, 1500), (333, 777), (720, 1280)])
def test_bucket_size_is_snapped_and_capped(width, height, short_side):
    bucket_w, bucket_h = bucket_size(width, height, short_side)
    budget = {704: 1216, 512: 768, 384: 576, 256: 384}.get(short_side, 1.5 * short_side)
    assert bucket_w % 64 == 0 and bucket_h % 64 == 0
    assert (bucket_w >= bucket_h) == (width >= height) or bucket_w == bucket_h
    # each side is the nearest multiple of 64 of a size whose area is within the cap
    scale = min(short_side / min(width, height), (short_side * budget / (width * height)) ** 0.5)
    assert abs(bucket_w - width * scale) <= 32 + 1e-6 or bucket_w == 64
    assert abs(bucket_h - height * scale) <= 32 + 1e-6 or bucket_h == 64


def test_resize_to_bucket_keeps_aspect_by_cropping():
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    image[:, 240:260] = 255  # a vertical bar in the middle stays in the middle
    resized = resize_to_bucket(image, 256)
    assert resized.shape == (256, 384, 3) and resized.dtype == np.uint8
    bar = np.flatnonzero(resized[128, :, 0] > 128)
    assert abs(bar.mean() - 192) < 2


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_with_memory_bounded(tmp_path):
    """A 13000² PNG (a few hundred KB on disk, 507 MB as RGB) is refused before a pixel is decoded."""
    import subprocess
    import sys

    from common.errors import InputTooLarge

    huge = tmp_path / "huge.png"
    Image.new("1", (13000, 13000)).save(huge)
    with pytest.raises(InputTooLarge, match=r"^huge.png: 13000x13000 is 169000000 pixels, over .* limit of 64000000"):
        load_image(huge.read_bytes(), name="huge.png", max_pixels=64_000_000)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
    probe = ("import re, sys\nfrom avatar_model.media.image import load_image\n"
             "try:\n    load_image(open(sys.argv[1], 'rb').read(), max_pixels=64_000_000)\nexcept Exception as e:\n"
             "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "    print(type(e).__name__, int(hwm) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True, check=True).stdout
    error, peak_mib = out.split()
    assert error == "InputTooLarge" and int(peak_mib) < 150, f"peak RSS {peak_mib} MiB: it was decoded"
