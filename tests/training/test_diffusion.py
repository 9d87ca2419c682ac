"""The diffusion process (training-sample construction) and the loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import addp
from addp.training.data import load_digits
from addp import ops
from addp.training.diffusion import DiffusionConfig, DiffusionProcess, MaskSchedule, mask_ratio_grid
from addp.training.loss import addp_loss, hard_target_cross_entropy, soft_target_cross_entropy


def test_grid_is_the_cosine_grid_between_the_bounds():
    ratios, probs = mask_ratio_grid(DiffusionConfig())
    expected = sorted(r for i in range(101) if 0.5 <= (r := math.cos(math.pi / 2 * i / 100)) < 1.0)
    assert torch.allclose(ratios, torch.tensor(expected, dtype=torch.float64))
    assert torch.all(ratios[1:] > ratios[:-1])


def test_grid_weights_are_the_truncated_normal_pdf():
    ratios, probs = mask_ratio_grid(DiffusionConfig())
    tn = stats.truncnorm((0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25, loc=0.55, scale=0.25)
    pdf = torch.tensor(tn.pdf(ratios.numpy()))
    assert torch.allclose(probs, pdf / pdf.sum(), atol=1e-12)


@pytest.mark.parametrize("seq_len", [64, 256, 7])
def test_mask_counts_and_nesting_are_exact_at_every_grid_point(seq_len):
    sched = MaskSchedule(DiffusionConfig(), seq_len)
    g = torch.Generator().manual_seed(0)
    last = len(sched.ratios) - 1
    for i in range(last + 1):
        for j in {min(i + d, last) for d in range(1, 6)}:
            m = sched.masks_at(i, j, 4, "cpu", g)
            n_t = math.ceil(seq_len * float(sched.ratios[i]))
            n_next = math.ceil(seq_len * float(sched.ratios[j]))
            assert (m.mask_t.sum(1) == n_t).all() and (m.mask_next.sum(1) == n_next).all()
            assert not (m.mask_t & ~m.mask_next).any()  # mask_{t+1} contains mask_t


def test_offsets_are_uniform_one_to_five_and_clamped():
    sched = MaskSchedule(DiffusionConfig(), 256)
    g = torch.Generator().manual_seed(0)
    last = len(sched.ratios) - 1
    pairs = [sched.draw_indices(g) for _ in range(3000)]
    assert {j - i for i, j in pairs if i + 5 <= last} == {1, 2, 3, 4, 5}
    assert all(j == min(j, last) and j > i or (i == last and j == last) for i, j in pairs)


def test_sampled_ratio_indices_follow_the_weights_chi_square():
    sched = MaskSchedule(DiffusionConfig(), 256)
    g = torch.Generator().manual_seed(1)
    n = 20000
    counts = torch.bincount(torch.tensor([sched.draw_indices(g)[0] for _ in range(n)]),
                            minlength=len(sched.probs)).double()
    expected = sched.probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p_value = stats.chi2.sf(chi2, df=len(expected) - 1)
    assert p_value > 1e-3, (chi2, p_value)


def test_fixed_masking_masks_half():
    sched = MaskSchedule(DiffusionConfig(masking="fixed"), 64)
    m = sched.draw(3, "cpu", torch.Generator().manual_seed(0))
    assert (m.mask_t.sum(1) == 32).all() and (m.mask_next.sum(1) >= 32).all()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="mapping"):
        DiffusionConfig(mapping="mean")
    with pytest.raises(ValueError, match="ratios"):
        DiffusionConfig(ratio_min=0.9, ratio_max=0.5)


def test_soft_loss_on_a_hand_computed_example():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # B=1, L=2, V=3
    target = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])  # K=2 < V
    mask = torch.tensor([[True, False]])  # only position 0 counts
    eps = 0.1
    z = math.log(math.exp(2.0) + 1 + math.exp(-1.0))
    logp = [2.0 - z, 0.0 - z, -1.0 - z]
    expected = -(1 - eps) * (0.25 * logp[0] + 0.75 * logp[1]) - eps * sum(logp) / 3
    got = soft_target_cross_entropy(logits, target, mask, eps)
    assert abs(got.item() - expected) < 1e-6


def test_soft_loss_equals_torch_cross_entropy_with_padded_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    target = torch.randn(2, 5, 7, generator=g).softmax(-1)
    mask = torch.rand(2, 5, generator=g) < 0.6
    padded = F.pad(target, (0, 4))
    per = F.cross_entropy(logits.permute(0, 2, 1), padded.permute(0, 2, 1), reduction="none", label_smoothing=0.1)
    expected = (per * mask).sum() / mask.sum()
    assert torch.allclose(soft_target_cross_entropy(logits, target, mask), expected, atol=1e-6)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    one_hot = F.one_hot(ids, 7).float()
    assert torch.allclose(hard_target_cross_entropy(logits, ids, mask),
                          soft_target_cross_entropy(logits, one_hot, mask), atol=1e-6)


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    return addp.create_model("vqgan_small"), addp.create_model("mage_vit_small")


def _sample(frozen, seed=0, indices=None, **kw):
    tok, pred = frozen
    proc = DiffusionProcess(tok, pred, DiffusionConfig(**kw))
    if indices is not None:
        proc.schedule.draw_indices = lambda generator=None: indices
    images = load_digits("heldout")[0][:4]
    g, ng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    return proc, images, proc(images, g, ng)


def test_inputs_condition_on_t_plus_1_and_targets_on_t(frozen):
    tok, pred = frozen
    proc, images, s = _sample(frozen, indices=(0, 5))
    assert s.mask.sum() < s.mask_next.sum()
    z0 = tok.encode(images)
    assert torch.equal(s.ids, z0)
    with torch.no_grad():
        q_next, q_t = pred(z0, s.mask_next), pred(z0, s.mask)
        emb = ops.codebook_weighted_sum_reference(q_next, tok.codebook, z0, s.mask)
        x_t = tok.decode_embeddings(emb).clamp(0, 1)
    assert torch.allclose(s.x_t, x_t, atol=1e-4)
    err_t = (s.target - q_t.softmax(-1) * s.mask[..., None]).abs().max()
    err_next = (s.target - q_next.softmax(-1) * s.mask[..., None]).abs().max()
    assert err_t < 1e-6 and err_next > 100 * err_t  # the target conditions on t, not t+1
    assert s.num_reliable == 64 - int(s.mask[0].sum())


def test_compiled_frozen_passes_give_the_eager_sample(frozen):
    """--compile's frozen passes (weights frozen into the graphs on CPUs) give the eager sample;
    the tokens, masks and noise are the same, the pixels and targets within float rounding."""
    proc, images, eager = _sample(frozen, seed=5)
    proc.compile()
    g, ng = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    fast = proc(images, g, ng)
    assert torch.equal(fast.ids, eager.ids) and torch.equal(fast.mask, eager.mask)
    assert torch.allclose(fast.x_t, eager.x_t, atol=1e-4)
    assert torch.allclose(fast.target, eager.target, atol=1e-5)


def test_argmax_mapping_decodes_the_argmax_tokens(frozen):
    tok, pred = frozen
    proc, images, s = _sample(frozen, mapping="argmax")
    with torch.no_grad():
        guess = pred(s.ids, s.mask_next).argmax(-1)
        x_t = tok.decode_ids(torch.where(s.mask, guess, s.ids)).clamp(0, 1)
    assert torch.allclose(s.x_t, x_t, atol=1e-4)


def test_same_condition_uses_one_predictor_pass(frozen):
    tok, pred = frozen
    proc, images, s = _sample(frozen, condition="same")
    with torch.no_grad():
        emb = ops.codebook_weighted_sum_reference(pred(s.ids, s.mask), tok.codebook, s.ids, s.mask)
    assert torch.allclose(s.x_t, tok.decode_embeddings(emb).clamp(0, 1), atol=1e-4)


def test_sample_mapping_is_seeded(frozen):
    a = _sample(frozen, seed=3, mapping="sample")[2]
    b = _sample(frozen, seed=3, mapping="sample")[2]
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.mask, b.mask)


def test_codebook_mismatch_is_refused(frozen):
    tok, _ = frozen
    with pytest.raises(ValueError, match="codebook"):
        DiffusionProcess(tok, addp.create_model("mage_vit_small", codebook_size=128))


def test_loss_on_a_sample_is_finite_and_trains_the_network(frozen):
    proc, images, s = _sample(frozen, indices=(0, 3))  # about half masked: pixels matter
    net = addp.create_model("addp_vit_small")
    logits = net(s.x_t, s.ids, s.mask, s.num_reliable)
    for kind in ("soft", "hard", "both"):
        assert torch.isfinite(addp_loss(logits, s.ids, s.mask, s.target, kind))
    addp_loss(logits, s.ids, s.mask, s.target).backward()
    assert net.decoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.patch_embed.proj.weight.grad.abs().sum() > 0
