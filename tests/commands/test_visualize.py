"""`python -m addp.visualize` on a tiny random checkpoint: figure layout and tile contents."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import addp
from addp import sampling as S
from addp import visualize as V
from addp.sampling.pipeline import ADDPPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vis") / "tiny.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small"),
                                "tokenizer": addp.create_model("vqgan_small")})
    return path


def run(ckpt, out, *extra):
    return V.cli(["--checkpoint", str(ckpt), "--output", str(out), "--device", "cpu", *extra])


def test_shown_steps():
    assert V.shown_steps(4, 1) == [0, 1, 2, 3]
    assert V.shown_steps(5, 2) == [0, 2, 4]
    assert V.shown_steps(6, 2) == [0, 2, 4, 5]
    assert V.shown_steps(1, 3) == [0]
    assert V.default_scale(32) == 2 and V.default_scale(64) == 1 and V.default_scale(256) == 1


def test_figure_layout_and_tiles(ckpt, tmp_path, capsys):
    out = tmp_path / "fig.png"
    N, T, every = 3, 4, 2
    assert run(ckpt, out, "--num-images", str(N), "--steps", str(T), "--every", str(every), "--seed", "5",
               "--temperature", "1", "--precision", "fp32") == 0  # compared with an fp32 run by hand
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    steps = [0, 2, 3]  # 1-based 1, 3 and the last, 4
    assert summary["shown_steps"] == [1, 3, 4] and summary["scale"] == 2  # 32-px images: tiles of 64 px
    fig = np.asarray(Image.open(out).convert("RGB"))

    tile = 32 * 2
    groups = len(steps)
    width = 2 * V.MARGIN + groups * (3 * tile + 2 * V.PAD) + (groups - 1) * V.GAP
    height = V.HEADER + 2 * V.MARGIN + N * tile + (N - 1) * V.PAD
    assert fig.shape == (height, width, 3)
    assert summary["size"] == [width, height]

    # the same run, by hand
    pipe = ADDPPipeline.from_pretrained(ckpt, device="cpu")
    result = S.generate(pipe.net, pipe.tokenizer, N, S.SamplerConfig(steps=T, temperature=1.0),
                        generator=torch.Generator().manual_seed(5), return_intermediates=True)

    def tile_at(row, group, kind):
        x0 = V.MARGIN + group * (3 * tile + 2 * V.PAD + V.GAP) + kind * (tile + V.PAD)
        y0 = V.HEADER + V.MARGIN + row * (tile + V.PAD)
        return fig[y0:y0 + tile, x0:x0 + tile]

    for g, s in enumerate(steps):
        for r in range(N):
            # image tile: the decoded image after step s, each pixel a 2x2 block
            img = (result.step_images[s][r].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(tile_at(r, g, 0), img.repeat(2, 0).repeat(2, 1))
            # mask tile: unreliable token cells white, each token 4 px * 2 = 8 px
            m = result.step_masks[s][r].reshape(8, 8).numpy()
            expected = np.where(m, 255, 0).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            assert np.array_equal(tile_at(r, g, 1), np.stack([expected] * 3, -1))
    # PCA tile of one step: token_embedding_pca upscaled (nearest)
    pca = V.token_embedding_pca(pipe.net, result.step_ids[2])  # (N, 3, 8, 8); step 2 is group 1
    pca = (pca[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(tile_at(1, 1, 2), pca.repeat(8, 0).repeat(8, 1))
    assert not result.step_masks[-1].any() and (tile_at(0, 2, 1) == 0).all()  # all reliable at the end


def test_token_embedding_pca():
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small").eval()
    ids = torch.randint(0, net.config.codebook_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[1] = ids[0].flip(0)
    img = V.token_embedding_pca(net, ids)
    assert img.shape == (2, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    flat = img.flatten(2)  # (B, 3, L): the same id gets the same colour
    assert torch.equal(flat[1], flat[0].flip(-1))
    assert not torch.equal(flat[0, :, 0], flat[0, :, 1]) or ids[0, 0] == ids[0, 1]


def test_explicit_scale(ckpt, tmp_path, capsys):
    out = tmp_path / "s1.png"
    assert run(ckpt, out, "--num-images", "1", "--steps", "2", "--scale", "1") == 0
    fig = np.asarray(Image.open(out))
    assert fig.shape[:2] == (V.HEADER + 2 * V.MARGIN + 32,
                             2 * V.MARGIN + 2 * (3 * 32 + 2 * V.PAD) + V.GAP)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("args,match", [
    (["--num-images", "0"], "num-images"),
    (["--every", "0"], "every"),
    (["--scale", "0"], "scale"),
    (["--steps", "0"], "steps"),
    (["--top-p", "0"], "top-p"),
])
def test_bad_options(ckpt, tmp_path, capsys, args, match):
    assert run(ckpt, tmp_path / "f.png", *args) == 2
    assert match in one_line_error(capsys)
    assert not (tmp_path / "f.png").exists()


def test_unwritable_output_and_missing_tokenizer(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(ckpt, blocker / "f.png", "--steps", "2") == 2
    assert "cannot write" in one_line_error(capsys)
    path = tmp_path / "net.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small")})
    assert run(path, tmp_path / "f.png", "--steps", "2") == 2
    assert "tokenizer" in one_line_error(capsys)
