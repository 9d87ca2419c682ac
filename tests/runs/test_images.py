"""Image files as datasets really hold them: 16-bit and float files keep their values,
decompression bombs are refused per file (training skips them, a single input is one error)."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import addp
from addp import inpaint as I
from addp.training.data import ImageFolderDataset, make_loader
from addp.runs.images import UnreadableImage, open_image, read_rgb
from addp.sampling.image_io import _image_tensor

pytestmark = pytest.mark.usefixtures("one_thread")

EIGHT_BIT = 1 / 255


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (zlib + CRC), so any header a file may claim can be made."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rgb48_png(path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG of `pixels` (H, W, 3) uint16."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))
    path.write_bytes(png_bytes(w, h, 16, 2, rows))


def bomb_png(path, side: int) -> None:
    """A grey PNG whose header claims side x side pixels (its data is one byte)."""
    path.write_bytes(png_bytes(side, side, 8, 0, b"\x00"))


def grey16(seed=0, shape=(24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


def as_unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


# -- 16-bit and float files ----------------------------------------------------------------
def test_16bit_grey_png_keeps_its_values(tmp_path):
    a = grey16()
    Image.fromarray(a).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    rgb = as_unit(read_rgb(tmp_path / "g.png"))
    truth = a / 65535
    assert np.abs(rgb - truth[..., None]).max() <= EIGHT_BIT
    # what PIL's own conversion does with the same file: values above 255/65535 become white
    clipped = as_unit(Image.open(tmp_path / "g.png").convert("RGB"))
    assert np.abs(clipped - truth[..., None]).max() > 0.5


def test_16bit_rgb_png_keeps_its_values(tmp_path):
    a = np.random.default_rng(1).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    rgb48_png(tmp_path / "c.png", a)
    assert np.abs(as_unit(read_rgb(tmp_path / "c.png")) - a / 65535).max() <= EIGHT_BIT


def test_int32_and_float_tiffs_keep_their_values(tmp_path):
    a = grey16(2)
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "i.tiff")
    f = np.random.default_rng(3).random((24, 20)).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "i.tiff").mode == "I" and Image.open(tmp_path / "f.tiff").mode == "F"
    assert np.abs(as_unit(read_rgb(tmp_path / "i.tiff")) - (a / 65535)[..., None]).max() <= EIGHT_BIT
    assert np.abs(as_unit(read_rgb(tmp_path / "f.tiff")) - f[..., None]).max() <= EIGHT_BIT
    assert np.asarray(Image.open(tmp_path / "f.tiff").convert("RGB")).max() <= 1  # PIL's clip: black


@pytest.mark.parametrize("array, match", [
    (np.full((4, 4), np.nan, np.float32), "NaN or Inf"),
    (np.full((4, 4), 70000, np.int32), "outside 0..65535"),
    (np.full((4, 4), -1, np.int32), "outside 0..65535"),
])
def test_pixels_without_a_scale_are_unreadable(tmp_path, array, match):
    Image.fromarray(array).save(tmp_path / "x.tiff")
    with pytest.raises(UnreadableImage, match=match):
        open_image(tmp_path / "x.tiff")


def test_training_folder_reads_16bit_files_at_their_scale(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(grey16(ord(c), (16, 16))).save(tmp_path / c / "0.png")
    data = ImageFolderDataset(tmp_path, 16, train=False)
    for (path, _), i in zip(data.samples, range(2)):
        x, _, bad = data[i]
        truth = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float64) / 65535).float()
        assert bad == 0 and x.shape == (3, 16, 16)
        assert (x - truth).abs().max() <= EIGHT_BIT + 1e-6


def test_inpainting_keeps_known_pixels_of_a_16bit_input(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = addp.save_checkpoint(tmp_path / "tiny.safetensors", {"addp": addp.create_model("addp_vit_small"),
                                                                "tokenizer": addp.create_model("vqgan_small")})
    a = grey16(4, (32, 32))
    Image.fromarray(a).save(tmp_path / "in16.png")
    hole = np.zeros((32, 32), bool)
    hole[8:20, 8:24] = True
    Image.fromarray(np.where(hole, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "res.png"
    assert I.cli(["--checkpoint", str(ckpt), "--image", str(tmp_path / "in16.png"), "--mask",
                  str(tmp_path / "mask.png"), "--steps", "2", "--output", str(out)]) == 0
    result = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255
    known = (a / 65535)[~hole]
    assert np.abs(result[~hole] - known[:, None]).max() <= EIGHT_BIT


def test_pipeline_scales_a_16bit_pil_image():
    a = grey16(5, (8, 8))
    x, was_pil = _image_tensor(Image.fromarray(a))
    assert was_pil and x.shape == (1, 3, 8, 8)
    assert (x[0] - torch.from_numpy(a / 65535).float()).abs().max() <= EIGHT_BIT + 1e-6


# -- decompression bombs ---------------------------------------------------------------------
@pytest.mark.parametrize("side", [60000, 10000])  # PIL's error (> 2x the limit) and its warning
def test_decompression_bomb_is_refused(tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    bomb_png(tmp_path / "bomb.png", side)
    with pytest.raises(UnreadableImage, match="decompression bomb") as e:
        open_image(tmp_path / "bomb.png")
    assert "\n" not in str(e.value)


def test_decompression_bomb_in_a_training_folder_is_counted_as_unreadable(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    bomb_png(tmp_path / "a" / "2_bomb.png", 60000)
    data = ImageFolderDataset(tmp_path, 8)
    assert len(data) == 5
    images, labels, bad = next(iter(make_loader(data, 5, 0, 0, 1, 0, 0)))
    assert images.shape == (5, 3, 8, 8) and bad == 1


def test_decompression_bomb_as_inpainting_input_is_one_error_line(tmp_path, capsys, tiny_checkpoint):
    bomb_png(tmp_path / "bomb.png", 60000)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "mask.png")
    code = I.cli(["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "bomb.png"),
                  "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "decompression bomb" in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_single_input_errors_keep_their_messages(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(addp.AddpError, match="not a readable image"):
        _image_tensor(tmp_path / "notes.png")
    with pytest.raises(addp.AddpError, match="image not found"):
        _image_tensor(tmp_path / "missing.png")
