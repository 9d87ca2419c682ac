"""Tests of the alternating denoising sampler on the tiny presets with random weights."""
import math

import pytest
import torch

import addp
from addp import ops
from addp import sampling as S

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
    return ops.gumbel(torch.rand(shape, generator=g, dtype=dtype))


def sample(logits, g, top_p=1.0):
    """Candidate ids of (B, L, K) logits from the sampler's op (every position unreliable)."""
    B, L, _ = logits.shape
    ids, _ = ops.gumbel_topk_unmask(logits, torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.bool),
                                    0, 0.0, generator=g, top_p=top_p)
    return ids


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


@pytest.mark.cuda
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
    got = sample(logits, torch.Generator().manual_seed(3), top_p=1.0)
    expected = torch.argmax(logits + gumbel(logits.shape, torch.Generator().manual_seed(3), torch.float32), -1)
    assert torch.equal(got, expected)


def test_tiny_top_p_is_argmax(models):
    logits = torch.randn(4, 16, 50)
    u1 = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0))
    ids, mask = torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.bool)
    sampled, _ = ops.gumbel_topk_unmask_reference(logits, u1, torch.rand(4, 16, dtype=torch.float64), ids, mask, 0,
                                                  0.0, keep=ops.nucleus_keep(logits, 1e-6))
    assert torch.equal(sampled, logits.argmax(-1))
    assert torch.equal(sample(logits, torch.Generator().manual_seed(0), top_p=1e-6), logits.argmax(-1))

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
    draws = sample(probs.log().expand(1, n, 4), torch.Generator().manual_seed(0))[0]
    counts = torch.bincount(draws, minlength=4).double()
    stat = float(((counts - n * probs.double()) ** 2 / (n * probs.double())).sum())
    assert chi2_sf(stat, df=3) > 1e-3

    # top_p = 0.7 keeps {0.5, 0.25} (the mass before 0.25 is 0.5 < 0.7; before 0.15 it is 0.75)
    draws = sample(probs.log().expand(1, n, 4), torch.Generator().manual_seed(1), top_p=0.7)[0]
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
    {"temperature": -1.0}, {"temperature_schedule": "dynamic"}, {"parity": "yes"},
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


def test_compiled_parts_follow_weights_changed_in_place(models):
    """On CPUs the compiled graphs hold the weights as constants (freezing): changing a weight
    in place must rebuild them, not sample with the old weights."""
    import copy
    net, tok = (copy.deepcopy(m) for m in models)
    config = S.SamplerConfig(steps=2, temperature=1.0)
    S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4), compile=True)
    with torch.no_grad():
        for p in tok.decoder.conv_out.parameters():
            p.mul_(-1.0)
        net.load_state_dict({k: v * 1.01 for k, v in net.state_dict().items()})
    eager = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4))
    fast = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(4), compile=True)
    assert torch.allclose(fast, eager, atol=1e-4)
    # networks of the same shapes, other weights, compiled one after the other: each gets graphs
    # of its own weights
    for shift in (0.25, -0.25):
        other_net, other_tok = (copy.deepcopy(m) for m in models)
        with torch.no_grad():
            other_tok.decoder.conv_out.bias.add_(shift)
        eager = S.generate(other_net, other_tok, 2, config, generator=torch.Generator().manual_seed(4))
        fast = S.generate(other_net, other_tok, 2, config, generator=torch.Generator().manual_seed(4), compile=True)
        assert torch.allclose(fast, eager, atol=1e-4)


# --------------------------------------------------------------------------- the schedule object
def old_start_step(num_tokens, unreliable, steps, schedule):
    """The start step as the inpainting code computed it: the last s whose m(s/T) masks at
    least ``unreliable`` positions."""
    start = 0
    for s in range(steps):
        r = s / steps
        ratio = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1 - r
        if math.ceil(num_tokens * ratio) >= unreliable:
            start = s
    return start


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("parity", [False, True])
def test_start_step_equals_the_direct_formula(schedule, parity):
    checked = 0
    for L in (1, 4, 16, 64, 100, 256):
        for T in (1, 2, 3, 7, 20, 64, 256):
            sched = S.Schedule(S.SamplerConfig(steps=T, schedule=schedule, parity=parity), L)
            for unreliable in range(0, L + 1):
                assert sched.start_step(unreliable) == old_start_step(L, unreliable, T, schedule), (L, T, unreliable)
                checked += 1
    assert checked > 3000
    with pytest.raises(ValueError, match="unreliable"):
        sched.start_step(L + 1)


@pytest.mark.parametrize("options", [dict(), dict(schedule="linear", steps=7), dict(steps=1, parity=True),
                                     dict(temperature_schedule="static", temperature=2.5, steps=5)])
def test_schedule_lengths_and_temperatures(options):
    config = S.SamplerConfig(**options)
    T, tau0 = config.steps, config.temperature
    sched = S.Schedule(config, 64)
    assert sched.mask_lengths == S.mask_schedule(64, T, config.schedule, config.parity)
    expected_tau = [tau0 if config.temperature_schedule == "static" else tau0 * (1 - (s + 1) / T) for s in range(T)]
    assert sched.temperatures == pytest.approx(expected_tau, abs=1e-12)
    assert S.choice_temperatures(config) == sched.temperatures
    assert sched.temperatures[-1] == (tau0 if config.temperature_schedule == "static" else 0)


def test_plan_from_nothing_and_from_known_tokens():
    config = S.SamplerConfig(steps=10, parity=True)
    sched = S.Schedule(config, 64)
    plan = sched.plan()
    assert [p.index for p in plan] == list(range(10)) and [p.timestep for p in plan] == list(range(9, -1, -1))
    assert [p.mask_len for p in plan] == sched.mask_lengths
    assert [p.num_reliable for p in plan] == [0] + [64 - n for n in sched.mask_lengths[:-1]]
    assert [p.temperature for p in plan] == sched.temperatures
    for unreliable in (1, 5, 30, 63, 64):
        plan = sched.plan(unreliable)
        assert plan[0].index == sched.start_step(unreliable) and plan[-1].index == 9
        assert plan[0].num_reliable == 64 - unreliable
        left = unreliable
        for p in plan:  # known tokens never become unreliable; the schedule caps the rest
            assert p.mask_len == min(sched.mask_lengths[p.index], left) and p.num_reliable == 64 - left
            left = p.mask_len


# --------------------------------------------------------------------------- protocols and options
def test_protocols_are_the_official_release_settings():
    # configs/release/*/generate_addp_*.sh + main_generate.py defaults (ChangyaoTian/ADDP 7c2c034)
    p20, p256 = S.SAMPLER_PROTOCOLS["paper-steps20"], S.SAMPLER_PROTOCOLS["paper-steps256"]
    assert (p20.steps, p20.schedule, p256.steps, p256.schedule) == (20, "cosine", 256, "linear")
    for p in (p20, p256):
        assert (p.temperature, p.temperature_schedule, p.top_p, p.parity) == (6.0, "annealed", 1.0, True)


def test_sampler_config_resolves_protocol_and_overrides():
    assert S.sampler_config() == S.SamplerConfig()
    assert S.sampler_config(protocol="paper-steps256") == S.SAMPLER_PROTOCOLS["paper-steps256"]
    got = S.sampler_config(protocol="paper-steps256", steps=8, top_p=None)
    assert got == S.SamplerConfig(steps=8, schedule="linear", parity=True)
    assert S.sampler_config(S.SamplerConfig(steps=3), parity=True) == S.SamplerConfig(steps=3, parity=True)
    for kwargs, match in [(dict(protocol="paper"), "protocol must be one of"),
                          (dict(config=S.SamplerConfig(), protocol="paper-steps20"), "not both"),
                          (dict(steps=0), "steps")]:
        with pytest.raises(ValueError, match=match) as info:
            S.sampler_config(**kwargs)
        assert "\n" not in str(info.value)


def test_generate_takes_protocol_and_options(models):
    net, tok = models
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    ref = S.generate(net, tok, 2, S.SamplerConfig(steps=STEPS, schedule="linear", parity=True), generator=g())
    assert torch.equal(S.generate(net, tok, 2, protocol="paper-steps256", steps=STEPS, generator=g()), ref)
    assert torch.equal(S.generate(net, tok, 2, steps=STEPS, schedule="linear", parity=True, generator=g()), ref)
    static = S.generate(net, tok, 2, steps=STEPS, schedule="linear", parity=True, temperature_schedule="static",
                        generator=g())
    assert not torch.equal(static, ref)


# --------------------------------------------------------------------------- generators and callbacks
def test_list_of_generators_gives_each_image_its_own_run(models):
    net, tok = models
    seeds = (0, 1, 2)
    batch = S.generate(net, tok, 3, generator=[torch.Generator().manual_seed(s) for s in seeds], steps=STEPS,
                       top_p=0.9, return_intermediates=True)
    for i, s in enumerate(seeds):
        one = S.generate(net, tok, 1, generator=torch.Generator().manual_seed(s), steps=STEPS, top_p=0.9,
                         return_intermediates=True)
        for a, b in zip(batch.step_ids + batch.step_masks, one.step_ids + one.step_masks):
            assert torch.equal(a[i], b[0])  # every choice the same
        # images: the same up to the float rounding of batched CPU kernels
        torch.testing.assert_close(batch.images[i], one.images[0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        S.generate(net, tok, 3, generator=[torch.Generator(), torch.Generator()], steps=STEPS)


def test_list_of_generators_across_batches(models):
    net, tok = models
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(3)]  # noqa: E731
    a = S.generate(net, tok, 3, generator=gens(), steps=2, batch_size=2, return_intermediates=True)
    b = S.generate(net, tok, 3, generator=gens(), steps=2, batch_size=1, return_intermediates=True)
    assert all(torch.equal(x, y) for x, y in zip(a.step_ids, b.step_ids))


def test_callback_sees_every_step_and_can_replace_the_state(models):
    net, tok = models
    seen = []

    def record(i, step, state):
        seen.append((i, step, {k: v.clone() for k, v in state.items()}))

    out = S.generate(net, tok, 2, S.SamplerConfig(steps=STEPS), generator=torch.Generator().manual_seed(0),
                     callback=record, return_intermediates=True)
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert [st.mask_len for _, st, _ in seen] == S.mask_schedule(64, STEPS)
    for s, (_, _, state) in enumerate(seen):
        assert torch.equal(state["image"], out.step_images[s]) and torch.equal(state["ids"], out.step_ids[s])
        assert torch.equal(state["mask"], out.step_masks[s])

    def zero_reliable_ids(i, step, state):  # after step 2, every reliable id becomes 0
        if i == 2:
            return {"ids": torch.where(state["mask"], state["ids"], 0)}

    edited = S.generate(net, tok, 2, S.SamplerConfig(steps=STEPS), generator=torch.Generator().manual_seed(0),
                        callback=zero_reliable_ids, return_intermediates=True)
    fixed = ~edited.step_masks[2]
    assert fixed.any() and (edited.step_ids[2][fixed] == 0).all()
    assert (edited.step_ids[-1][fixed] == 0).all()  # reliable tokens never change afterwards
    assert torch.equal(edited.step_ids[1], out.step_ids[1])


@pytest.mark.parametrize("bad,match", [({"latents": None}, "may return"),
                                       ({"mask": torch.zeros(2, 64, dtype=torch.bool)}, "unreliable"),
                                       ({"ids": torch.zeros(2, 63, dtype=torch.long)}, "shape")])
def test_bad_callback_results(models, bad, match):
    with pytest.raises(ValueError, match=match):
        S.generate(*models, 2, S.SamplerConfig(steps=2), callback=lambda i, step, state: bad)
