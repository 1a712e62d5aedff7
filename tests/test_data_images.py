"""Safe image loading: every mode becomes RGB, every broken file a DatasetError naming it."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.images import image_size, is_image_file, load_image
from lora_trainer.errors import DatasetError


def _halves(w=40, h=20, left=(255, 0, 0), right=(0, 0, 255)):
    im = Image.new("RGB", (w, h), left)
    im.paste(Image.new("RGB", (w // 2, h), right), (w // 2, 0))
    return im


def _exif_rotated(path, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _halves().save(path, exif=exif)
    return path


def test_rgb_png_round_trips_exactly(tmp_path):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    src.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (32, 24)
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_exif_orientation_is_applied(tmp_path):
    path = _exif_rotated(tmp_path / "rot.png")
    out = load_image(path)
    assert out.size == (20, 40)  # stored 40x20, orientation 6 = rotate 90 degrees clockwise
    arr = np.asarray(out)
    # stored left half (red) ends up on top after a clockwise turn
    assert tuple(arr[2, 10]) == (255, 0, 0)
    assert tuple(arr[37, 10]) == (0, 0, 255)
    assert tuple(image_size(path)) == (20, 40)


def test_image_size_reads_header(tmp_path):
    Image.new("RGB", (48, 16)).save(tmp_path / "s.jpg")
    size = image_size(tmp_path / "s.jpg")
    assert (size.width, size.height) == (48, 16)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 0, 255))
    im.putpixel((2, 2), (0, 0, 0, 128))
    im.convert(mode).save(tmp_path / "a.png")
    arr = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (0, 0, 0)
    assert 120 <= arr[2, 2, 0] <= 135  # half transparent black on white is mid grey


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((3, 3), 1)
    im.save(tmp_path / "p.png", transparency=0)
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[3, 3]) == (0, 0, 255)


def test_plain_palette_and_grayscale(tmp_path):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    im.save(tmp_path / "p.png")
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 0]) == (0, 200, 0)
    Image.new("L", (8, 8), 77).save(tmp_path / "g.png")
    assert tuple(np.asarray(load_image(tmp_path / "g.png"))[4, 4]) == (77, 77, 77)
    Image.new("1", (8, 8), 1).save(tmp_path / "b.bmp")
    assert tuple(np.asarray(load_image(tmp_path / "b.bmp"))[4, 4]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg")
    r, g, b = np.asarray(out)[8, 8]
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257
    arr[0, 0] = 0
    arr[1, 1] = 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert tuple(out[4, 4]) == (128, 128, 128)
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(tmp_path / "anim.gif")
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[4, 4]
    assert r > 200 and g < 50 and b < 50


def test_animated_webp_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    r, g, b = np.asarray(load_image(tmp_path / "anim.webp"))[4, 4]
    assert g > 200 and r < 50


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png.*empty.*remove it"):
        load_image(path)
    with pytest.raises(DatasetError, match="empty.png"):
        image_size(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DatasetError, match="junk.jpg.*Re-export"):
        load_image(path)


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.png.*(truncated|corrupt).*Re-export"):
        load_image(tmp_path / "cut.png")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nothere.png.*not found"):
        load_image(tmp_path / "nothere.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb_header_is_refused(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(DatasetError, match="bomb.png.*too large"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(DatasetError, match="bomb.png"):
        image_size(tmp_path / "bomb.png")


def test_max_pixels_limit(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(DatasetError, match="big.png.*64x64.*Downscale"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    assert load_image(tmp_path / "big.png", max_pixels=4096).size == (64, 64)


def test_is_image_file():
    assert is_image_file("a/b.PNG") and is_image_file("x.jpeg") and is_image_file("x.webp")
    assert not is_image_file("x.txt") and not is_image_file("x.tiff") and is_image_file("x.gif")


def test_image_size_reads_only_the_header_and_verify_reads_the_data(tmp_path):
    from lora_trainer.data.images import verify_image

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert tuple(image_size(tmp_path / "cut.png")) == (48, 64)
    assert tuple(verify_image(tmp_path / "full.png")) == (48, 64)
    with pytest.raises(DatasetError, match="cut.png.*truncated"):
        verify_image(tmp_path / "cut.png")


def test_exif_rotated_jpeg(tmp_path):
    from lora_trainer.data.images import verify_image

    exif = Image.Exif()
    exif[0x0112] = 8
    _halves().save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert tuple(image_size(tmp_path / "r.jpg")) == (20, 40) == tuple(verify_image(tmp_path / "r.jpg"))
    arr = np.asarray(load_image(tmp_path / "r.jpg")).astype(int)
    # orientation 8 = rotate 90 degrees counter-clockwise: stored right half (blue) ends up on top
    assert arr[2, 10, 2] > 200 and arr[2, 10, 0] < 60
    assert arr[37, 10, 0] > 200 and arr[37, 10, 2] < 60


def test_16_bit_rgb_png(tmp_path):
    w, h = 4, 3
    arr = np.zeros((h, w, 3), dtype=">u2")
    arr[..., 0], arr[..., 1] = 65535, 32896
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
    (tmp_path / "rgb48.png").write_bytes(data + _png_chunk(b"IEND", b""))
    assert load_image(tmp_path / "rgb48.png").getpixel((1, 1)) == (255, 128, 0)
