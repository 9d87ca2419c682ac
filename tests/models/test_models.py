"""Behaviour of the three models: shapes, masking semantics, precision, registry."""
import logging

import pytest
import torch
import torch.nn.functional as F

import addp
from addp.models.registry import AddpError

SMALL = ("vqgan_small", "mage_vit_small", "addp_vit_small")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return {n: addp.create_model(n).eval() for n in SMALL}


def test_registry_lists_every_kind():
    names = addp.list_models()
    for n in ("vqgan_mage", "mage_vit_base_patch16", "mage_vit_large_patch16",
              "addp_vit_base_patch16", "addp_vit_large_patch16", "addp_resnet50", *SMALL):
        assert n in names
    assert addp.list_models("tokenizer") == ["vqgan_mage", "vqgan_small"]


def test_create_model_overrides_and_rejects_unknown_options():
    m = addp.create_model("addp_vit_small", decoder_depth=1)
    assert len(m.decoder_blocks) == 1 and m.config.name == "addp_vit_small"
    with pytest.raises(AddpError, match="no option"):
        addp.create_model("addp_vit_small", decoder_layers=1)
    with pytest.raises(AddpError, match="unknown model"):
        addp.create_model("addp_vit_huge")


def test_tokenizer_quantizes_to_the_nearest_codebook_vector(small):
    tok = small["vqgan_small"]
    x = torch.rand(3, 3, 32, 32)
    ids = tok.encode(x)
    assert ids.shape == (3, 64) and ids.dtype == torch.int64
    z = tok.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, tok.config.embed_dim)
    brute = torch.cdist(z, tok.codebook).argmin(1)
    assert torch.equal(ids.flatten(), brute)
    img = tok.decode_ids(ids)
    assert img.shape == (3, 3, 32, 32)
    assert torch.allclose(img, tok.decode_embeddings(tok.codebook[ids]))
    assert torch.allclose(img, tok.decode_ids(ids.view(3, 8, 8)))


def test_tokenizer_rejects_images_it_cannot_tokenize(small):
    with pytest.raises(ValueError, match="multiple of the tokenizer stride"):
        small["vqgan_small"].encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected images"):
        small["vqgan_small"].encode(torch.rand(1, 32, 32))


def test_tokenizer_training_pass_has_gradients(small):
    tok = addp.create_model("vqgan_small")
    recon, ids, vq_loss = tok(torch.rand(2, 3, 32, 32))
    (F.mse_loss(recon, torch.rand_like(recon)) + vq_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0


def test_predictor_ignores_ids_at_masked_positions(small):
    pred = small["mage_vit_small"]
    ids = torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64) < 0.6
    logits = pred(ids, mask)
    assert logits.shape == (2, 64, 256)
    other = torch.where(mask, torch.randint(0, 256, (2, 64)), ids)
    assert torch.allclose(logits, pred(other, mask), atol=1e-6)
    changed = ids.clone()
    changed[~mask] = (changed[~mask] + 1) % 256
    assert not torch.allclose(logits, pred(changed, mask))


def test_predictor_drop_keeps_shapes_and_ignores_dropped_ids(small):
    pred = small["mage_vit_small"]
    ids = torch.randint(0, 256, (2, 64))
    noise = torch.rand(2, 64)
    rank = noise.argsort(1).argsort(1)
    drop, mask = rank < 32, rank < 48  # drop is a subset of mask, 32 per row
    out = pred(ids, mask, drop=drop, num_kept=32)
    assert out.shape == (2, 64, 256)
    assert torch.allclose(out, pred(ids, mask, drop=drop))  # num_kept inferred


def test_predictor_computes_only_the_codebook_logits_unless_asked(small):
    pred = small["mage_vit_small"]
    ids = torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64) < 0.6
    full = pred(ids, mask, all_logits=True)
    assert full.shape == (2, 64, pred.config.vocab_size)
    assert torch.allclose(pred(ids, mask), full[..., :256], atol=1e-5)


def test_predictor_training_loss_smooths_over_the_whole_vocabulary(small):
    """MAGE's loss: label smoothing 0.1 spread over all V logits (codebook, class labels and
    mask token), mean over the masked positions."""
    from addp.training.stages import PredictorStage
    tok, pred = small["vqgan_small"], small["mage_vit_small"]
    stage = PredictorStage(pred, tok)
    inputs = stage.prepare(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = stage.loss_module(**inputs)
        logits = pred(inputs["ids"], inputs["mask"], inputs["drop"], inputs["num_kept"], all_logits=True)

    def official(logits):
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, inputs["ids"][..., None])[..., 0]
        per_pos = 0.9 * nll + 0.1 * -logp.mean(-1)
        m = inputs["mask"].float()
        return (per_pos * m).sum() / m.sum()

    assert torch.allclose(loss, official(logits), rtol=1e-5)
    assert not torch.allclose(loss, official(logits[..., :256]), rtol=1e-3)  # codebook-only smoothing


def _official_token_input(net, ids, mask):
    """The official decoder's reliable-token input, by boolean indexing."""
    B = ids.shape[0]
    emb = net.token_emb(ids)[~mask].reshape(B, -1, net.config.embed_dim)
    pos = net.decoder_pos_token_embed[:, 1:].expand(B, -1, -1)[~mask].reshape(B, -1, net.config.decoder_embed_dim)
    return emb + pos


def test_addp_token_input_matches_boolean_indexing(small):
    net = small["addp_vit_small"]
    ids = torch.randint(0, 256, (3, 64))
    noise = torch.rand(3, 64)
    mask = noise.argsort(1).argsort(1) < 40  # 24 reliable per row, scattered
    ours = net._reliable_token_input(ids, mask, 24)
    assert torch.equal(ours, _official_token_input(net, ids, mask))


def test_addp_reads_only_reliable_ids_and_the_image(small):
    net = small["addp_vit_small"]
    img = torch.rand(2, 3, 32, 32)
    ids = torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64).argsort(1).argsort(1) < 40
    logits = net(img, ids, mask, num_reliable=24)
    assert logits.shape == (2, 64, net.config.vocab_size)
    noise_ids = torch.where(mask, torch.randint(0, 256, (2, 64)), ids)
    assert torch.allclose(logits, net(img, noise_ids, mask), atol=1e-6)
    assert not torch.allclose(logits, net(torch.rand(2, 3, 32, 32), ids, mask))


def test_addp_rejects_a_mask_of_the_wrong_length(small):
    with pytest.raises(ValueError, match="positions"):
        small["addp_vit_small"](torch.rand(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long),
                                torch.ones(1, 16, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_is_close_to_fp32(small, dtype):
    net = small["addp_vit_small"]
    img, ids = torch.rand(2, 3, 32, 32), torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64).argsort(1).argsort(1) < 32
    ref = net(img, ids, mask).softmax(-1)
    with torch.autocast("cpu", dtype=dtype):
        low = net(img, ids, mask).float().softmax(-1)
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05


def test_attention_backends_agree(small):
    import addp.models.layers as layers
    net = small["addp_vit_small"]
    img, ids = torch.rand(2, 3, 32, 32), torch.randint(0, 256, (2, 64))
    mask = torch.rand(2, 64).argsort(1).argsort(1) < 40
    outputs = {}
    for name in layers.ATTENTION_BACKENDS:
        with layers.attention_backend(name):
            outputs[name] = net(img, ids, mask, 24)
    assert layers.ATTENTION_BACKEND == "sdpa"  # restored
    for name, out in outputs.items():
        assert torch.allclose(out, outputs["math"], atol=1e-4), name


def test_attention_functions_agree_over_shapes():
    import addp.models.layers as layers
    g = torch.Generator().manual_seed(0)
    for B, H, N, Dh in [(1, 1, 1, 8), (3, 4, 17, 16), (2, 2, 130, 32)]:
        q, k, v = (torch.randn(B, H, N, Dh, generator=g) for _ in range(3))
        ref = torch.softmax(q @ k.transpose(-2, -1) / Dh ** 0.5, -1) @ v
        for name in layers.ATTENTION_BACKENDS:
            with layers.attention_backend(name):
                assert torch.allclose(layers.attention(q, k, v), ref, atol=1e-5), (name, B, H, N, Dh)


def test_xformers_falls_back_to_sdpa_with_one_log_line(caplog, monkeypatch):
    import builtins
    import importlib.util

    import addp.models.layers as layers
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(builtins, "__import__", no_xformers)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("xformers") else real_find_spec(name, *a))
    monkeypatch.setattr(layers, "_XFORMERS", {})
    # the commands send the package's log to stderr and stop it there; caplog listens at the root
    monkeypatch.setattr(logging.getLogger("addp"), "propagate", True)
    q = torch.randn(1, 2, 5, 8)
    with caplog.at_level("WARNING", logger="addp.models.layers"), layers.attention_backend("xformers"):
        a = layers.attention(q, q, q)
        b = layers.attention(q, q, q)  # probed once
    assert torch.equal(a, torch.nn.functional.scaled_dot_product_attention(q, q, q)) and torch.equal(a, b)
    lines = [r.getMessage() for r in caplog.records if "xformers" in r.getMessage()]
    assert len(lines) == 1 and "scaled_dot_product_attention" in lines[0]
    assert 'xformers attention needs xformers, which is not installed: pip install "addp[xformers]"' in lines[0]


def test_unknown_attention_backend_is_refused():
    import addp.models.layers as layers
    with pytest.raises(ValueError, match="attention backend must be one of"):
        layers.set_attention_backend("flash9")
    assert layers.ATTENTION_BACKEND == "sdpa"


def test_timm_encoder_preset_runs_at_its_grid():
    net = addp.create_model("addp_resnet50", image_size=64, patch_size=16, decoder_depth=1).eval()
    logits = net(torch.rand(1, 3, 64, 64), torch.zeros(1, 16, dtype=torch.long),
                 torch.ones(1, 16, dtype=torch.bool))
    assert logits.shape == (1, 16, 1024 + 1001)
    assert not hasattr(net, "blocks") and hasattr(net, "encoder")


def test_sdpa_on_cpu_in_bf16_computes_in_fp32():
    """torch's CPU flash kernel is slow in bf16: the sdpa backend runs it on fp32 copies."""
    import addp.models.layers as layers
    q, k, v = (torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    with layers.attention_backend("sdpa"), torch.autocast("cpu", torch.bfloat16):
        fast = layers.attention(q, k, v)
    exact = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 8 ** 0.5, -1) @ v.double()
    assert fast.dtype == torch.bfloat16
    # fp32 inside: only the final rounding to bf16 (<= 1/2 ulp, 2^-9 relative) remains
    torch.testing.assert_close(fast.double(), exact, rtol=2 ** -8, atol=1e-6)
