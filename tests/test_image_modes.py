"""Every image mode Pillow opens, as a file path and as a PIL object, gives transformers' pixel values.

Reference: transformers' slow/PIL Qwen2-VL image processor (`Qwen2VLImageProcessorPil`), fed the same input: a path
(a str: `image_utils.load_image`, then `convert_to_rgb`) or a PIL object (`convert_to_rgb` only). The cases that
differ between the two routes are single-colour transparency (PNG tRNS, GIF): on the path route Pillow's
`convert("RGB")` keeps the transparent colour, and the composite then turns every pixel of that colour white."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from minigmr.processor import ImageProcessor, load_rgb
from oracles import make_hf_image_processor

W, H = 64, 48
MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def rgb_array():
    """A gradient with a pure-red block (the transparent colour below) and a blue one."""
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    a[10:30, 10:30] = (255, 0, 0)
    a[35:45, 40:60] = (0, 0, 255)
    return a


def alpha_array():
    y, x = np.mgrid[0:H, 0:W]
    a = ((x * 255) // (W - 1)).astype(np.uint8)
    a[:, :8] = 0
    return a


def gray_array():
    y, x = np.mgrid[0:H, 0:W]
    g = ((x * 4 + y) % 256).astype(np.uint8)
    g[10:30, 10:30] = 77
    return g


def palette_image():
    """6 colours; index 1 is red, and index 5 is the same red (not transparent in the file)."""
    idx = np.zeros((H, W), np.uint8)
    idx[:, 16:32], idx[:, 32:48], idx[:, 48:] = 2, 3, 4
    idx[10:30, 10:30] = 1
    idx[35:45, 0:20] = 5
    im = Image.frombytes("P", (W, H), idx.tobytes())
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 200, 200, 255, 0, 0])
    return im


def with_transparency(im, value):
    im.info["transparency"] = value
    return im


def png16(path, alpha: bool):
    """16-bit RGB(A) PNG, written by hand (Pillow cannot write it)."""
    a = rgb_array().astype(np.uint16) * 257
    if alpha:
        a = np.dstack([a, alpha_array().astype(np.uint16) * 257])
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    header = struct.pack(">IIBBBBB", W, H, 16, 6 if alpha else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def variants():
    """(name, PIL object or None, file extension or None, save kwargs)."""
    rgb, alpha, gray = rgb_array(), alpha_array(), gray_array()
    g16 = gray.astype(np.uint16) * 257
    rgba = lambda: Image.fromarray(np.dstack([rgb, alpha]))
    la = lambda: Image.merge("LA", (Image.fromarray(gray), Image.fromarray(alpha)))
    rgba_palette = palette_image()
    rgba_palette.putpalette([c for i in range(6) for c in rgba_palette.getpalette()[3 * i:3 * i + 3]
                             + [(255, 0, 128, 255, 64, 255)[i]]], "RGBA")
    pa = Image.merge("PA", (palette_image(), Image.fromarray(alpha)))
    pa.putpalette(palette_image().getpalette())
    bits = lambda: Image.fromarray(gray > 128).convert("1")
    return [
        ("RGB", Image.fromarray(rgb), "png", {}),
        ("RGB jpeg", Image.fromarray(rgb), "jpg", {"quality": 95}),
        ("RGB + tRNS colour", with_transparency(Image.fromarray(rgb), (255, 0, 0)), "png",
         {"transparency": (255, 0, 0)}),
        ("RGB 16-bit", None, "png16", {}),
        ("RGBA", rgba(), "png", {}),
        ("RGBA tiff", rgba(), "tif", {}),
        ("RGBA 16-bit", None, "png16a", {}),
        ("RGBA + EXIF rotation", rgba(), "png", {"exif_orientation": 3}),
        ("RGBa", rgba().convert("RGBa"), None, {}),
        ("RGBX", Image.fromarray(rgb).convert("RGBX"), "tif", {}),
        ("LA", la(), "png", {}),
        ("L", Image.fromarray(gray), "png", {}),
        ("L + tRNS grey", with_transparency(Image.fromarray(gray), 77), "png", {"transparency": 77}),
        ("P", palette_image(), "png", {}),
        ("P gif", palette_image(), "gif", {}),
        ("P + tRNS index", with_transparency(palette_image(), 1), "png", {"transparency": 1}),
        ("P + transparent index gif", with_transparency(palette_image(), 1), "gif", {"transparency": 1}),
        ("P + tRNS index + EXIF rotation", with_transparency(palette_image(), 1), "png",
         {"transparency": 1, "exif_orientation": 8}),
        ("P + tRNS alphas", with_transparency(palette_image(), bytes([255, 0, 128, 255, 64, 255])), "png",
         {"transparency": bytes([255, 0, 128, 255, 64, 255])}),
        ("P with RGBA palette", rgba_palette, "png", {}),
        ("PA", pa, None, {}),
        ("I;16", Image.frombytes("I;16", (W, H), g16.astype("<u2").tobytes()), "png", {}),
        ("I;16 + tRNS", with_transparency(Image.frombytes("I;16", (W, H), g16.astype("<u2").tobytes()), 77 * 257),
         "png", {"transparency": 77 * 257}),
        ("I", Image.fromarray(g16.astype(np.int32)), "tif", {}),
        ("F", Image.fromarray(gray.astype(np.float32) + 0.4), "tif", {}),
        ("1", bits(), "png", {}),
        ("1 + tRNS", with_transparency(bits(), 0), "png", {"transparency": 0}),
        ("CMYK", Image.fromarray(rgb).convert("CMYK"), "jpg", {"quality": 95}),
        ("CMYK tiff", Image.fromarray(rgb).convert("CMYK"), "tif", {}),
        ("YCbCr", Image.fromarray(rgb).convert("YCbCr"), "tif", {}),
        ("LAB", Image.fromarray(rgb).convert("LAB"), "tif", {}),
        ("HSV", Image.fromarray(rgb).convert("HSV"), None, {}),
        ("RGB jpeg + EXIF rotation", Image.fromarray(rgb), "jpg", {"quality": 95, "exif_orientation": 6}),
    ]


VARIANTS = variants()


def save(name, im, ext, kwargs, folder):
    slug = "".join(c if c.isalnum() else "_" for c in name)
    if ext.startswith("png16"):
        path = folder / f"{slug}.png"
        png16(path, alpha=ext == "png16a")
        return path
    kwargs = dict(kwargs)
    orientation = kwargs.pop("exif_orientation", None)
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    path = folder / f"{slug}.{ext}"
    im.save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def processors():
    return make_hf_image_processor(MIN_PIXELS, MAX_PIXELS), ImageProcessor(MIN_PIXELS, MAX_PIXELS)


def assert_same_pixels(ref_proc, ours, make):
    """make() -> a fresh input; the RGB image and the pixel values must equal transformers'."""
    x = make()
    ref_rgb = convert_to_rgb(load_image(x) if isinstance(x, str) else x, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_rgb(make())), ref_rgb)
    ref = ref_proc([make()], return_tensors="np")
    pixels, grid = ours([make()])
    np.testing.assert_array_equal(grid.numpy(), ref["image_grid_thw"])
    np.testing.assert_allclose(pixels.numpy(), ref["pixel_values"], rtol=0, atol=1e-6)


SAVED = [v for v in VARIANTS if v[2] is not None]
BUILT = [v for v in VARIANTS if v[1] is not None]


@pytest.mark.parametrize("name,im,ext,kwargs", SAVED, ids=[v[0] for v in SAVED])
def test_path_and_opened_file_match_transformers(name, im, ext, kwargs, tmp_path, processors):
    path = str(save(name, im, ext, kwargs, tmp_path))
    assert_same_pixels(*processors, lambda: path)  # a str path: load_image, then convert_to_rgb
    assert_same_pixels(*processors, lambda: Image.open(path))  # a PIL object: convert_to_rgb only


@pytest.mark.parametrize("name,im,ext,kwargs", BUILT, ids=[v[0] for v in BUILT])
def test_pil_object_matches_transformers(name, im, ext, kwargs, processors):
    assert_same_pixels(*processors, lambda: im.copy())


def test_transparent_colour_of_a_path_turns_white(tmp_path):
    """The path route's quirk, pinned: a palette PNG whose index 1 (red) is transparent; index 5 is the same red.
    Both become white, as in transformers, while a PIL object composites index 1 only."""
    im = with_transparency(palette_image(), 1)
    path = tmp_path / "p.png"
    im.save(path, transparency=1)
    from_path = np.asarray(load_rgb(str(path)))
    assert (from_path[10:30, 10:30] == 255).all() and (from_path[35:45, 0:20] == 255).all()
    from_object = np.asarray(load_rgb(Image.open(path)))
    assert (from_object[10:30, 10:30] == 255).all() and (from_object[35:45, 0:20] == (255, 0, 0)).all()
