"""Tests of the alternating denoising sampler on the tiny presets with random weights."""
import math

import pytest
import torch

import addp
from addp import sampler as S

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops: on a shared, busy CPU, OpenMP threads spin-waiting on each other make them ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return addp.create_model("addp_vit_small").eval(), addp.create_model("vqgan_small").eval()


def run(models, seed=0, n=2, **options):
    net, tok = models
    g = torch.Generator().manual_seed(seed)
    return S.generate(net, tok, n, S.SamplerConfig(**{"steps": STEPS, **options}), generator=g,
                      return_intermediates=True)


def gumbel(shape, g, dtype):
    u = torch.rand(shape, generator=g, dtype=dtype)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))


def chi2_sf(x, df):
    """Survival function of the chi-square distribution for df = 1 or 3 (closed forms)."""
    if df == 1:
        return math.erfc(math.sqrt(x / 2))
    assert df == 3
    return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2)


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("L,T", [(64, 6), (64, 20), (256, 12), (64, 1), (10, 30)])
def test_mask_schedule_matches_independent_formula(schedule, parity, L, T):
    expected = []
    for s in range(T):
        r = (s + 1) / T
        m = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1 - r
        expected.append(min(L, max(1, math.ceil(L * m))))
    if not parity:
        expected[-1] = 0
    got = S.mask_schedule(L, T, schedule, parity)
    assert got == expected
    assert all(a >= b for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("parity", [False, True])
def test_unreliable_count_follows_schedule_and_reliable_tokens_never_change(models, schedule, parity):
    out = run(models, schedule=schedule, parity=parity)
    L = models[0].config.num_patches
    lengths = S.mask_schedule(L, STEPS, schedule, parity)
    assert lengths[-1] == (1 if parity else 0)
    prev_ids, prev_mask = None, torch.ones(2, L, dtype=torch.bool)
    for ids, mask, img, n in zip(out.step_ids, out.step_masks, out.step_images, lengths):
        assert mask.sum(1).tolist() == [n, n]
        assert not (mask & ~prev_mask).any()  # a reliable position never becomes unreliable
        if prev_ids is not None:
            fixed = ~prev_mask
            assert torch.equal(ids[fixed], prev_ids[fixed])
        assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
        prev_ids, prev_mask = ids, mask
    assert torch.equal(out.images, out.step_images[-1])


def test_modes_differ_only_in_the_last_mask(models):
    a, b = run(models, parity=False), run(models, parity=True)
    for s in range(STEPS - 1):
        assert torch.equal(a.step_ids[s], b.step_ids[s]) and torch.equal(a.step_masks[s], b.step_masks[s])
        assert torch.equal(a.step_images[s], b.step_images[s])
    assert torch.equal(a.step_ids[-1], b.step_ids[-1])
    assert not a.step_masks[-1].any() and b.step_masks[-1].sum(1).tolist() == [1, 1]
    net, tok = models
    with torch.no_grad():
        hard = tok.decode_ids(a.step_ids[-1]).clamp(0, 1)
    torch.testing.assert_close(a.images, hard, atol=1e-5, rtol=0)


def test_step_loop_has_no_host_sync(models, monkeypatch):
    """CPU proxy: every tensor -> Python conversion raises inside the sampler."""
    def host_sync(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with torch.no_grad():
        S.sample_batch(*models, 2, S.SamplerConfig(steps=3, top_p=0.9), torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda(models):
    net, tok = (m.cuda() for m in models)
    try:
        g = torch.Generator("cuda").manual_seed(0)
        torch.cuda.set_sync_debug_mode("error")
        with torch.no_grad():
            images = S.sample_batch(net, tok, 2, S.SamplerConfig(steps=3, top_p=0.9), g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        net.cpu(), tok.cpu()
    assert images.is_cuda and images.shape == (2, 3, 32, 32)


# --------------------------------------------------------------------------- randomness
def test_same_seed_same_images_different_seed_different(models):
    a, b, c = run(models, seed=1).images, run(models, seed=1).images, run(models, seed=2).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batching_and_plain_output(models):
    net, tok = models
    net.train()
    try:
        g = torch.Generator().manual_seed(0)
        images = S.generate(net, tok, 3, S.SamplerConfig(steps=2), generator=g, batch_size=2)
        assert net.training and not tok.training  # training flags restored
    finally:
        net.eval()
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_top_p_one_is_plain_categorical():
    logits = torch.randn(4, 16, 50)
    got = S.sample_categorical(logits, torch.Generator().manual_seed(3), top_p=1.0)
    expected = torch.argmax(logits + gumbel(logits.shape, torch.Generator().manual_seed(3), torch.float32), -1)
    assert torch.equal(got, expected)


def test_tiny_top_p_is_argmax(models):
    logits = torch.randn(4, 16, 50)
    noise = gumbel(logits.shape, torch.Generator().manual_seed(0), torch.float32)
    assert torch.equal(S.sample_ids(logits, noise, top_p=1e-6), logits.argmax(-1))

    net, tok = models
    out = run(models, top_p=1e-6)
    L, K = net.config.num_patches, net.config.codebook_size
    with torch.no_grad():  # step 0 sees only <MASK>: every position is a candidate
        first = net(torch.zeros(2, 3, 32, 32), torch.zeros(2, L, dtype=torch.long),
                    torch.ones(2, L, dtype=torch.bool), 0)[..., :K]
    assert torch.equal(out.step_ids[0], first.argmax(-1))


def test_categorical_frequencies_chi_square():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    draws = S.sample_categorical(probs.log().expand(n, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double()
    stat = float(((counts - n * probs.double()) ** 2 / (n * probs.double())).sum())
    assert chi2_sf(stat, df=3) > 1e-3

    # top_p = 0.7 keeps {0.5, 0.25} (the mass before 0.25 is 0.5 < 0.7; before 0.15 it is 0.75)
    draws = S.sample_categorical(probs.log().expand(n, 4), torch.Generator().manual_seed(1), top_p=0.7)
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2:].sum() == 0
    expected = torch.tensor([2 / 3, 1 / 3], dtype=torch.double) * n
    stat = float(((counts[:2] - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, df=1) > 1e-3


# --------------------------------------------------------------------------- parity with the official loop
def official_loop(net, tok, batch, steps, tau0, schedule, g):
    """engine_generate.py's loop written out literally, drawing noise in the documented order."""
    K, L = tok.codebook.shape[0], net.config.num_patches
    x = torch.zeros(batch, 3, 32, 32)
    ids = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.ones(batch, L, dtype=torch.bool)
    trace = []
    for step in range(steps):
        logits = net(x, ids, mask)[..., :K]  # num_reliable counted by the model (host sync)
        sampled = torch.argmax(logits + gumbel((batch, L, K), g, torch.float32), dim=-1)
        ids_next = torch.where(mask, sampled, ids)

        probs = torch.softmax(logits, dim=-1)
        sampled_probs = torch.gather(probs, -1, ids_next.unsqueeze(-1)).squeeze(-1)
        sampled_probs = torch.where(mask, sampled_probs.double(), math.inf).float()
        step_ratio = 1.0 * (step + 1) / steps
        ratio = math.cos(math.pi / 2.0 * step_ratio) if schedule == "cosine" else 1.0 - step_ratio
        mask_len = min(max(math.ceil(L * ratio), 1), L)
        temp = tau0 * (1 - step_ratio)
        confidence = torch.log(sampled_probs) + (temp * gumbel((batch, L), g, torch.float64)).float()
        idx = torch.topk(confidence, k=mask_len, dim=-1, largest=False).indices
        mask_next = torch.zeros(batch, L, dtype=torch.bool)
        mask_next[torch.arange(batch).unsqueeze(-1), idx] = True

        soft = probs @ tok.codebook
        hard = tok.codebook[ids_next]
        x = tok.decode_embeddings(torch.where(mask_next.unsqueeze(-1), soft, hard)).clamp(0, 1)
        ids, mask = ids_next, mask_next
        trace.append((ids, mask, x))
    return trace


# With random weights the codebook is tiny (|e| < 1/K) and the decoder's GroupNorm scales it up,
# so the compiled weighted sum's float rounding (~1e-10) reaches ~1e-5 in the images: the 1e-5
# check runs on the reference backend (same arithmetic as the literal loop), auto gets 1e-4.
@pytest.mark.parametrize("backend,atol", [("reference", 1e-5), ("auto", 1e-4)])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_parity_mode_matches_literal_official_loop(models, schedule, backend, atol, monkeypatch):
    monkeypatch.setenv("ADDP_OPS_BACKEND", backend)
    net, tok = models
    out = run(models, seed=5, schedule=schedule, parity=True)
    with torch.no_grad():
        trace = official_loop(net, tok, 2, STEPS, 6.0, schedule, torch.Generator().manual_seed(5))
    for s, (ids, mask, x) in enumerate(trace):
        assert torch.equal(out.step_ids[s], ids), s
        assert torch.equal(out.step_masks[s], mask), s
        torch.testing.assert_close(out.step_images[s], x, atol=atol, rtol=0)
    assert trace[-1][1].sum(1).tolist() == [1, 1]


# --------------------------------------------------------------------------- options and visualisation
@pytest.mark.parametrize("options", [
    {"steps": 0}, {"steps": 2.5}, {"schedule": "exp"}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": -0.1},
    {"temperature": -1.0}, {"temperature_schedule": "dynamic"},
])
def test_bad_options_raise_one_line_value_error(options):
    with pytest.raises(ValueError) as info:
        S.SamplerConfig(**options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_num_images(models, n):
    with pytest.raises(ValueError, match="num_images") as info:
        S.generate(*models, n)
    assert "\n" not in str(info.value)


def test_token_embedding_pca(models):
    net, _ = models
    ids = torch.randint(0, net.config.codebook_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[1] = ids[0].flip(0)
    img = S.token_embedding_pca(net, ids)
    assert img.shape == (2, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    flat = img.flatten(2)  # (B, 3, L): the same id gets the same colour
    assert torch.equal(flat[1], flat[0].flip(-1))
    assert not torch.equal(flat[0, :, 0], flat[0, :, 1]) or ids[0, 0] == ids[0, 1]


def test_compiled_parts_give_the_eager_images(models):
    net, tok = models
    config = S.SamplerConfig(steps=3, temperature=1.0)
    eager = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4))
    fast = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4), compile=True)
    again = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4), compile=True)
    assert torch.allclose(fast, eager, atol=1e-4) and torch.equal(fast, again)
    assert S.compiled_models(net, tok) is S.compiled_models(net, tok)  # compiled once per pair
    assert not any("_addp" in k for k in net.state_dict())  # the cache is not part of the weights
    import copy
    assert copy.deepcopy(net)._addp_sampler_cache == {}
