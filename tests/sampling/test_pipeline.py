"""ADDPPipeline on the tiny presets with random weights: generation, loading, inpainting, outpainting."""
import numpy as np
import pytest
import torch
from PIL import Image

import addp
from addp import sampling as S
from addp.sampling.pipeline import ADDPPipeline, ADDPPipelineOutput

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return addp.create_model("addp_vit_small").eval(), addp.create_model("vqgan_small").eval()


@pytest.fixture(scope="module")
def pipe(models):
    return ADDPPipeline(*models)


@pytest.fixture(scope="module")
def ckpts(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    net, tok = models
    addp.save_checkpoint(d / "both.safetensors", {"addp": net, "tokenizer": tok})
    addp.save_checkpoint(d / "net.safetensors", {"addp": net})
    addp.save_checkpoint(d / "tok.safetensors", {"tokenizer": tok})
    folder = d / "folder"
    addp.save_checkpoint(folder / "addp.safetensors", {"addp": net})
    addp.save_checkpoint(folder / "tokenizer.safetensors", {"tokenizer": tok})
    return d


def gen(seed):
    return torch.Generator().manual_seed(seed)


def digit_like(n=1):
    x = torch.rand(n, 3, 32, 32, generator=gen(7))
    return x


# --------------------------------------------------------------------------- generation
def test_call_returns_pil_images(pipe):
    out = pipe(num_images=3, num_inference_steps=STEPS, generator=gen(0))
    assert isinstance(out, ADDPPipelineOutput) and len(out.images) == 3
    assert out[0] is out.images and out["images"] is out.images
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in out.images)


def test_call_pt_tensor_and_seeding(pipe):
    a, = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt", return_dict=False)
    b, = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt", return_dict=False)
    c, = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(1), output_type="pt", return_dict=False)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_more_images_than_max_batch_size_runs_in_batches(pipe, models):
    out = pipe(batch_size=5, num_inference_steps=STEPS, generator=gen(3), max_batch_size=2, output_type="pt").images
    ref = S.generate(*models, 5, S.SamplerConfig(steps=STEPS), generator=gen(3), batch_size=2)
    assert out.shape == (5, 3, 32, 32) and torch.equal(out, ref)


def test_bad_output_type(pipe):
    with pytest.raises(addp.AddpError, match="output_type"):
        pipe(num_images=1, num_inference_steps=STEPS, output_type="latent")


# --------------------------------------------------------------------------- loading
def test_from_pretrained_file_and_folder(ckpts, pipe):
    ref = pipe(num_images=1, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
    for source, kw in [(ckpts / "both.safetensors", {}), (ckpts / "folder", {}),
                       (ckpts / "net.safetensors", {"tokenizer": ckpts / "tok.safetensors"})]:
        p = ADDPPipeline.from_pretrained(source, device="cpu", **kw)
        out = p(num_images=1, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
        assert torch.equal(out, ref), source


def test_checkpoint_without_tokenizer_is_one_line_error(ckpts):
    with pytest.raises(addp.AddpError, match="no VQ tokenizer") as e:
        ADDPPipeline.from_pretrained(ckpts / "net.safetensors", device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(addp.AddpError, match="no ADDP network"):
        ADDPPipeline.from_pretrained(ckpts / "tok.safetensors", device="cpu")


# --------------------------------------------------------------------------- inpainting
def hole_mask():
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[6:19, 10:27] = True  # not aligned with the 4-px token cells
    return m


def test_inpaint_keeps_known_pixels_exactly_tensor(pipe):
    x, m = digit_like(2), hole_mask()
    y = pipe.inpaint(x, m, num_inference_steps=STEPS, generator=gen(0))
    assert y.shape == x.shape
    assert torch.equal(y[..., ~m], x[..., ~m])
    assert not torch.equal(y[..., m], x[..., m])
    y2 = pipe.inpaint(x, m, num_inference_steps=STEPS, generator=gen(0))
    assert torch.equal(y, y2)


def test_inpaint_keeps_known_pixels_exactly_pil_other_size(pipe, tmp_path):
    arr = (torch.rand(40, 48, 3, generator=gen(1)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(arr)
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (5, 5, 30, 20))
    image.save(tmp_path / "img.png")
    mask.save(tmp_path / "mask.png")
    for im, ms in [(image, mask), (tmp_path / "img.png", tmp_path / "mask.png")]:
        out = pipe.inpaint(im, ms, num_inference_steps=STEPS, generator=gen(0))
        assert isinstance(out, Image.Image) and out.size == (48, 40)
        hole = torch.from_numpy(np.array(mask)) > 127
        got = torch.from_numpy(np.array(out))
        assert torch.equal(got[~hole], torch.from_numpy(arr)[~hole])


def test_inpaint_keeps_reliable_tokens(pipe, monkeypatch):
    """Tokens whose cell misses the hole stay reliable with their encoded ids at every step."""
    x, m = digit_like(1), torch.zeros(32, 32, dtype=torch.bool)
    m[:8, :8] = True  # exactly token cells (0,0),(0,1),(1,0),(1,1)
    seen = []
    real = S.denoise_step

    def spy(net, tok, x_, ids, mask, step, *a):
        seen.append((ids.clone(), mask.clone(), step.num_reliable, step.mask_len))
        return real(net, tok, x_, ids, mask, step, *a)

    monkeypatch.setattr(S.step, "denoise_step", spy)
    pipe.inpaint(x, m, num_inference_steps=8, generator=gen(0))
    ids0, mask0, rel0, _ = seen[0]
    assert int(mask0.sum()) == 4 and rel0 == 60
    assert mask0[0, [0, 1, 8, 9]].all()
    assert len(seen) < 8  # started late in the schedule: 4 of 64 tokens unknown
    for ids, mask, rel, mask_len in seen:
        assert not (mask & ~mask0).any()  # known tokens never become unreliable
        assert torch.equal(ids[~mask0], ids0[~mask0]) and rel == 64 - int(mask.sum())


def test_start_step_matches_schedule():
    config = S.SamplerConfig(steps=20)
    for unreliable in (1, 5, 16, 40, 63, 64):
        s = S.Schedule(config, 64).start_step(unreliable)
        lengths = [64] + S.mask_schedule(64, 20, "cosine")
        assert lengths[s] >= unreliable and (s == 19 or lengths[s + 1] < unreliable)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(32, 30, dtype=torch.bool), "mask size"),
    (torch.zeros(32, 32, dtype=torch.bool), "all black"),
    (torch.ones(32, 32, dtype=torch.bool), "all white"),
])
def test_inpaint_bad_masks(pipe, bad, match):
    with pytest.raises(addp.AddpError, match=match):
        pipe.inpaint(digit_like(), bad, num_inference_steps=STEPS)


def test_inpaint_non_image_file(pipe, tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("not an image")
    with pytest.raises(addp.AddpError, match="not a readable image") as e:
        pipe.inpaint(f, hole_mask(), num_inference_steps=STEPS)
    assert "\n" not in str(e.value)
    with pytest.raises(addp.AddpError, match="not found"):
        pipe.inpaint(tmp_path / "missing.png", hole_mask(), num_inference_steps=STEPS)


# --------------------------------------------------------------------------- outpainting / uncropping
@pytest.mark.parametrize("margins", [dict(left=3, top=5), dict(right=8, bottom=1), dict(left=2, right=2, top=2, bottom=2)])
def test_outpaint_grows_canvas_by_margins(pipe, margins):
    x = digit_like(1)[0]
    y = pipe.outpaint(x, num_inference_steps=STEPS, generator=gen(0), **margins)
    l, r, t, b = (margins.get(k, 0) for k in ("left", "right", "top", "bottom"))
    assert y.shape == (3, 32 + t + b, 32 + l + r)
    assert torch.equal(y[:, t:t + 32, l:l + 32], x)


def test_outpaint_pil_and_bad_margins(pipe):
    image = Image.fromarray((torch.rand(32, 32, 3, generator=gen(2)) * 255).to(torch.uint8).numpy())
    out = pipe.outpaint(image, left=4, num_inference_steps=STEPS)
    assert isinstance(out, Image.Image) and out.size == (36, 32)
    assert out.crop((4, 0, 36, 32)).tobytes() == image.tobytes()
    with pytest.raises(addp.AddpError, match="margin"):
        pipe.outpaint(image)
    with pytest.raises(addp.AddpError, match="margins"):
        pipe.outpaint(image, left=-1)


def test_uncrop(pipe):
    x = digit_like(1)
    y = pipe.uncrop(x, 2.0, num_inference_steps=STEPS, generator=gen(0))
    assert y.shape == (1, 3, 32, 32)
    with pytest.raises(addp.AddpError, match="scale"):
        pipe.uncrop(x, 0.5)


# --------------------------------------------------------------------------- the diffusers-shaped call
def test_output_types_hold_the_same_images(pipe):
    pt = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(4), output_type="pt").images
    arr = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(4), output_type="np").images
    pil = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(4), output_type="pil").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    for im, x in zip(pil, pt):
        assert np.array_equal(np.asarray(im), (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    as_tuple = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(4), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and np.array_equal(as_tuple[0], arr)


def test_callback_on_step_end_records_every_step(pipe, models):
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        assert p is pipe
        calls.append((step, timestep, {k: v.clone() for k, v in callback_kwargs.items()}))
        return callback_kwargs

    out = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(5), output_type="pt",
               callback_on_step_end=callback).images
    ref = S.generate(*models, 2, S.SamplerConfig(steps=STEPS), generator=gen(5), return_intermediates=True)
    assert [c[0] for c in calls] == list(range(STEPS)) and [c[1] for c in calls] == list(range(STEPS - 1, -1, -1))
    for s, (_, _, kw) in enumerate(calls):
        assert set(kw) == {"image", "ids", "mask"}
        assert torch.equal(kw["image"], ref.step_images[s]) and torch.equal(kw["ids"], ref.step_ids[s])
        assert torch.equal(kw["mask"], ref.step_masks[s])
    assert torch.equal(out, ref.images) and torch.equal(calls[-1][2]["image"], out)


def test_callback_on_inpaint_sees_the_run_from_its_start_step(pipe):
    steps = []
    x, m = digit_like(1), hole_mask()
    pipe.inpaint(x, mask_image=m, num_inference_steps=8, generator=gen(0),
                 callback_on_step_end=lambda p, i, t, kw: steps.append((i, t, int(kw["mask"].sum()))))
    start = 8 - len(steps)
    assert start > 0 and [s[0] for s in steps] == list(range(len(steps)))
    assert [s[1] for s in steps] == list(range(8 - 1 - start, -1, -1)) and steps[-1][2] == 0


def test_list_of_generators_one_per_image(pipe):
    batch = pipe(num_images=3, num_inference_steps=STEPS, generator=[gen(s) for s in (7, 8, 9)],
                 output_type="pt").images
    for i, s in enumerate((7, 8, 9)):
        one = pipe(num_images=1, num_inference_steps=STEPS, generator=gen(s), output_type="pt").images
        torch.testing.assert_close(batch[i], one[0], atol=1e-4, rtol=0)  # batched kernels round differently
    a = pipe.inpaint(digit_like(2), hole_mask(), STEPS, generator=[gen(1), gen(2)])
    b = pipe.inpaint(digit_like(2)[1:], hole_mask(), STEPS, generator=gen(2))
    torch.testing.assert_close(a[1:], b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="generators"):
        pipe(num_images=3, num_inference_steps=STEPS, generator=[gen(0)])


def test_generator_on_cpu_with_model_on_cpu(pipe):
    assert pipe.device.type == "cpu"
    a = pipe(num_images=2, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(3), output_type="pt")
    torch.manual_seed(3)
    b = pipe(num_images=2, num_inference_steps=STEPS, output_type="pt")  # None: the global CPU RNG
    assert torch.equal(a.images, b.images)


def test_parity_and_protocol_through_the_pipeline(pipe, models):
    def config_run(**options):
        return S.generate(*models, 2, S.SamplerConfig(**options), generator=gen(6))

    run = lambda **kw: pipe(num_images=2, generator=gen(6), output_type="pt", **kw).images  # noqa: E731
    assert torch.equal(run(num_inference_steps=STEPS, parity=True), config_run(steps=STEPS, parity=True))
    assert torch.equal(run(protocol="paper-steps256", num_inference_steps=STEPS),
                       config_run(steps=STEPS, schedule="linear", parity=True))
    assert torch.equal(run(num_inference_steps=STEPS, temperature_schedule="static"),
                       config_run(steps=STEPS, temperature_schedule="static"))
    assert not torch.equal(run(num_inference_steps=STEPS, parity=True), run(num_inference_steps=STEPS))
    x, m = digit_like(1), hole_mask()
    a = pipe.inpaint(x, m, generator=gen(0), protocol="paper-steps20", num_inference_steps=STEPS)
    b = pipe.inpaint(x, m, generator=gen(0), num_inference_steps=STEPS, parity=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="protocol"):
        pipe(num_images=1, protocol="fid")


def test_to_moves_and_casts_both_networks(models):
    import copy
    p = ADDPPipeline(*(copy.deepcopy(m) for m in models))
    assert p.to("cpu", torch.bfloat16) is p
    assert p.dtype == torch.bfloat16 and p.tokenizer.codebook.dtype == torch.bfloat16
    images = p(num_images=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    filled = p.inpaint(digit_like(1), hole_mask(), STEPS, generator=gen(0))
    assert torch.equal(filled[..., ~hole_mask()], digit_like(1)[..., ~hole_mask()])
    p.to(dtype=torch.float32)
    assert p.dtype == torch.float32 and p.device.type == "cpu"


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_is_the_autocast_of_that_name(pipe, precision):
    # reference: the same call inside the caller's own autocast context
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        expected = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(3), output_type="pt").images
        expected_fill = pipe.inpaint(digit_like(), hole_mask(), num_inference_steps=STEPS, generator=gen(4))
    got = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(3), output_type="pt", precision=precision).images
    got_fill = pipe.inpaint(digit_like(), hole_mask(), num_inference_steps=STEPS, generator=gen(4), precision=precision)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_fill, expected_fill, rtol=0, atol=0)


def test_explicit_fp32_turns_off_the_callers_autocast(pipe):
    plain = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(5), output_type="pt").images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(5), output_type="pt",
                    precision="fp32").images
    torch.testing.assert_close(fp32, plain, rtol=0, atol=0)


def test_pipeline_and_generate_command_give_the_same_images(tiny_checkpoint, tmp_path):
    from addp.generate import cli
    from addp.runtime.seeds import batch_seed
    from addp.sampling.image_io import to_uint8
    args = ["--checkpoint", str(tiny_checkpoint), "--num-images", "2", "--batch-size", "2", "--steps", "3",
            "--seed", "11", "--precision", "bf16", "--output-dir", str(tmp_path / "out")]
    assert cli(args) == 0
    command = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png").convert("RGB")) for i in range(2)])
    api = ADDPPipeline.from_pretrained(tiny_checkpoint)
    images = api(num_images=2, num_inference_steps=3, generator=gen(batch_seed(11, 0)), output_type="pt",
                 precision="bf16").images
    np.testing.assert_array_equal(to_uint8(images).permute(0, 2, 3, 1).numpy(), command)
