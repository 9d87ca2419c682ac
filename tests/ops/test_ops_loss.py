"""Fused soft-target cross entropy (compiled CPU forward + backward) vs the reference and addp.training.loss."""
import pytest
import torch
from conftest import make_loss_inputs as make_inputs
from conftest import needs_c

from addp.training import loss as addp_loss
from addp.ops import soft_target_cross_entropy, soft_target_cross_entropy_reference


def loss_and_grad(logits, target, mask, smoothing, backend):
    x = logits.detach().clone().requires_grad_(True)
    loss = soft_target_cross_entropy(x, target, mask, smoothing, backend=backend)
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    return loss, grad


# (B, L, V, K): K = V, K = V - 2, K << V, V not a power of two, V up to 16386
SHAPES = [(1, 1, 16, 16), (2, 3, 7, 5), (64, 64, 514, 512), (2, 1024, 100, 98), (1, 4, 16386, 16384),
          (5, 33, 1001, 1000), (3, 7, 33, 1)]


@needs_c
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3), (torch.float16, 2e-3)])
def test_parity_cpu(i, dtype, tol):
    B, L, V, K = SHAPES[i]
    layout = ("contig", "sliced", "transposed")[i % 3]
    logits, target, mask = make_inputs(B, L, V, K, dtype, torch.float32 if i % 2 else dtype, layout, seed=i)
    smoothing = (0.1, 0.0, 0.3)[i % 3]
    loss, grad = loss_and_grad(logits, target, mask, smoothing, "cpu")
    ref_loss, ref_grad = loss_and_grad(logits, target, mask, smoothing, "reference")
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    # the gradient is stored in the logits' dtype: compare at that precision
    scale = ref_grad.float().abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, atol=4 * tol, rtol=0)


@needs_c
def test_matches_addp_loss_module():
    logits, target, mask = make_inputs(4, 20, 66, 64)
    expected = addp_loss.soft_target_cross_entropy(logits, target, mask, 0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, target, mask, 0.1, backend="cpu"), expected)


@needs_c
def test_gradcheck_float64():
    logits, target, mask = make_inputs(2, 3, 9, 7, torch.float64, layout="sliced")
    x = logits.detach().requires_grad_(True)
    fn = lambda x: soft_target_cross_entropy(x, target, mask, 0.2, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    torch.testing.assert_close(fn(x), soft_target_cross_entropy_reference(x, target, mask, 0.2))


@needs_c
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_mask_is_zero(backend):
    logits, target, mask = make_inputs(2, 5, 12, 10)
    loss, grad = loss_and_grad(logits, target, torch.zeros_like(mask), 0.1, backend)
    assert loss.item() == 0 and (grad == 0).all()


@needs_c
def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, mask = make_inputs(2, 5, 12, 10, dtype, layout="sliced")
        loss, lse, qsum = torch.ops.addp.soft_target_cross_entropy(logits, target, mask, 0.1)
        torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy.default, (logits, target, mask, 0.1))
        torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy_backward.default,
                              (torch.tensor(1.5), logits, target, mask, lse, qsum, 0.1))
        # with a gradient: checks the registered autograd (forward op -> backward op)
        torch.library.opcheck(torch.ops.addp.soft_target_cross_entropy.default,
                              (logits.detach().requires_grad_(True), target, mask, 0.1))


@needs_c
def test_op_is_differentiable_by_itself():
    """torch.ops.addp.soft_target_cross_entropy carries its autograd (register_autograd)."""
    logits, target, mask = make_inputs(3, 4, 11, 9, layout="transposed")
    x = logits.clone().requires_grad_(True)
    loss, lse, qsum = torch.ops.addp.soft_target_cross_entropy(x, target, mask, 0.2)
    assert not lse.requires_grad and not qsum.requires_grad
    (grad,) = torch.autograd.grad(loss, x)
    ref = x.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(soft_target_cross_entropy_reference(ref, target, mask, 0.2), ref)
    torch.testing.assert_close(grad, ref_grad)


@needs_c
def test_torch_compile():
    logits, target, mask = make_inputs(2, 6, 20, 18)
    x = logits.clone().requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return soft_target_cross_entropy(x * 2, target, mask, 0.1, backend="cpu")

    loss = f(x)
    loss.backward()
    ref_loss, ref_grad = loss_and_grad(logits * 2, target, mask, 0.1, "reference")
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(x.grad, 2 * ref_grad / 1.7)


def test_bad_inputs():
    logits, target, mask = make_inputs(2, 5, 12, 10)
    with pytest.raises(ValueError, match="K <= V"):
        soft_target_cross_entropy(logits[..., :8], target, mask)
    with pytest.raises(ValueError, match="smoothing"):
        soft_target_cross_entropy(logits, target, mask, 1.5)
    with pytest.raises(ValueError, match="bool"):
        soft_target_cross_entropy(logits, target, mask.float())


def test_auto_uses_reference_when_target_needs_grad():
    logits, target, mask = make_inputs(2, 5, 12, 10)
    t = target.clone().requires_grad_(True)
    soft_target_cross_entropy(logits, t, mask).backward()
    assert t.grad is not None
