"""load_image / load_label conversions and errors, and ImageFolder listing."""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from unsupseg.data import DataWarning, ImageFolder, load_image, load_label
from unsupseg.errors import DataError


def _noise_bytes(fmt: str, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _bad_files(folder):
    """name → path of each kind of unreadable file."""
    folder.mkdir(parents=True, exist_ok=True)
    png, jpg = _noise_bytes("PNG"), _noise_bytes("JPEG")
    contents = {
        "garbage.jpg": bytes(range(256)) * 4,
        "zero.png": b"",
        "notes.png": b"this is a text file renamed to png\n",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths, png, jpg


def _truncated(folder, fmt, ext):
    data = _noise_bytes(fmt)
    path = folder / f"truncated.{ext}"
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_images_are_not_loaded_leniently():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("name", ["garbage.jpg", "zero.png", "notes.png"])
def test_unreadable_files_raise_data_error_naming_the_file(tmp_path, name):
    paths, _, _ = _bad_files(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(paths[name]))):
        load_image(paths[name])


def test_zero_byte_file_message(tmp_path):
    paths, _, _ = _bad_files(tmp_path)
    with pytest.raises(DataError, match="empty file"):
        load_image(paths["zero.png"])


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files_raise_data_error(tmp_path, fmt, ext):
    path = _truncated(tmp_path, fmt, ext)
    Image.open(path).close()  # the header alone is fine: only a full decode finds the problem
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*cannot decode"):
        load_image(path)


def test_corrupted_png_data_raises(tmp_path):
    data = bytearray(_noise_bytes("PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_image(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")


def _pixels(img):
    assert img.mode == "RGB"
    return np.asarray(img)


def test_grayscale_and_bilevel(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8)).save(tmp_path / "g.png")
    gray = _pixels(load_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(gray[0], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])
    Image.fromarray(np.array([[False, True]])).save(tmp_path / "b.png")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "b.png"))[0], [[0] * 3, [255] * 3])


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png", transparency=0)
    out = _pixels(load_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 0, 255], [0, 255, 0]])
    img.save(tmp_path / "opaque.png")  # without transparency the palette colours come through
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "opaque.png"))[0, 0], [255, 0, 0])


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = _pixels(load_image(tmp_path / "a.png")).astype(int)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # fully transparent → background
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # half-transparent black over white
    Image.fromarray(np.array([[[0, 0]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "la.png"))[0, 0], [255, 255, 255])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = _pixels(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.all(np.abs(out - [255, 0, 0]) <= 8)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    out = _pixels(load_image(tmp_path / "16.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 4, 128, 255])  # v * 255 / 65535, rounded
    assert np.all(out[..., 0] == out[..., 2])


def test_float_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_pixels(load_image(tmp_path / "f.tif"))[0, :, 1], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # mark the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    rotated = load_image(tmp_path / "r.jpg")
    assert rotated.size == (2, 4)  # width and height swapped
    assert np.asarray(rotated)[0, 1].mean() > 128  # the marked corner moved to the top-right
    assert load_image(tmp_path / "r.jpg", exif_transpose=False).size == (4, 2)


def test_load_label_modes(tmp_path):
    Image.fromarray(np.array([[0, 7, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    out = load_label(tmp_path / "l.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 7, 255]])
    Image.fromarray(np.array([[0, 300, 65535]], dtype=np.uint16)).save(tmp_path / "l16.png")
    out16 = load_label(tmp_path / "l16.png")
    assert out16.dtype == np.uint16
    np.testing.assert_array_equal(out16, [[0, 300, 65535]])
    pal = Image.new("P", (3, 1))
    pal.putpalette([i for c in range(256) for i in (c, 255 - c, 0)])
    pal.putdata([0, 15, 255])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_label(tmp_path / "p.png"), [[0, 15, 255]])  # indices, not colours


def test_load_label_rejects_colour_and_bad_files(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png.*one channel"):
        load_label(tmp_path / "rgb.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        load_label(tmp_path / "empty.png")


# --- ImageFolder ------------------------------------------------------------------------------


def _good_folder(root, write_rgb):
    write_rgb(root / "b.jpg", seed=1)
    write_rgb(root / "a.PNG", seed=2)
    write_rgb(root / "sub" / "c.webp", seed=3, fmt="WEBP")
    write_rgb(root / "sub" / "deeper" / "d.tiff", seed=4)
    (root / "readme.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_rgb(root / ".hidden" / "e.jpg")
    return root


def test_image_folder_lists_recursively_sorted(tmp_path, write_rgb):
    ds = ImageFolder(_good_folder(tmp_path / "imgs", write_rgb))
    assert ds.ids == ["a", "b", "sub/c", "sub/deeper/d"]
    assert ds.classes is None and ds.num_classes is None and ds.name == "imgs"
    sample = ds[2]
    assert sample.id == "sub/c" and sample.label is None and sample.image.size == (8, 6)
    assert ds[-1].id == "sub/deeper/d"
    with pytest.raises(IndexError):
        ds[4]


def test_image_folder_skips_unreadable_files_with_a_warning(tmp_path, write_rgb):
    root = _good_folder(tmp_path / "imgs", write_rgb)
    paths, _, _ = _bad_files(root / "bad")
    with pytest.warns(DataWarning) as record:
        ds = ImageFolder(root)
    assert ds.ids == ["a", "b", "sub/c", "sub/deeper/d"]
    messages = " ".join(str(w.message) for w in record)
    for path in paths.values():
        assert str(path) in messages


@pytest.mark.parametrize("name", ["garbage.jpg", "zero.png", "notes.png"])
def test_image_folder_strict_raises(tmp_path, write_rgb, name):
    root = _good_folder(tmp_path / "imgs", write_rgb)
    paths, _, _ = _bad_files(tmp_path / "bad")
    os.replace(paths[name], root / name)
    with pytest.raises(DataError, match=re.escape(str(root / name))):
        ImageFolder(root, strict=True)


def test_image_folder_truncated_file_fails_at_getitem(tmp_path, write_rgb):
    root = tmp_path / "imgs"
    write_rgb(root / "a.jpg")
    path = _truncated(root, "JPEG", "jpg")  # header is fine, so it is listed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolder(root, strict=True)
    assert ds.ids == ["a", "truncated"]
    with pytest.raises(DataError, match=re.escape(str(path))):
        ds[1]


def test_image_folder_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "empty")) + ".*no usable image"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "missing")


def test_image_folder_only_bad_files_is_an_error(tmp_path):
    paths, _, _ = _bad_files(tmp_path / "bad")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="3 file"):
        ImageFolder(tmp_path / "bad")


def test_image_folder_single_file(tmp_path, write_rgb):
    path = write_rgb(tmp_path / "one.jpg")
    ds = ImageFolder(path)
    assert ds.ids == ["one"] and len(ds) == 1 and ds[0].image.size == (8, 6)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.jpg"):
        ImageFolder(tmp_path / "bad.jpg")


def test_image_folder_duplicate_ids(tmp_path, write_rgb):
    write_rgb(tmp_path / "x" / "a.jpg")
    write_rgb(tmp_path / "x" / "a.png")
    with pytest.raises(DataError, match="same id 'a'"):
        ImageFolder(tmp_path / "x")


def test_fingerprint_tracks_files(tmp_path, write_rgb):
    root = tmp_path / "imgs"
    write_rgb(root / "a.jpg")
    first = ImageFolder(root).fingerprint()
    assert ImageFolder(root).fingerprint() == first
    write_rgb(root / "b.jpg")
    second = ImageFolder(root).fingerprint()
    assert second != first
    write_rgb(root / "b.jpg", height=7, seed=5)  # same name, new content and size
    st = os.stat(root / "b.jpg")
    os.utime(root / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ImageFolder(root).fingerprint() not in (first, second)
