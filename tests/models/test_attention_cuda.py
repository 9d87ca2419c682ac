"""Attention on a GPU: torch's fused SDPA kernels (flash in bf16) against the math path.

Head dims 48 (not a power of two: 192 wide / 4 heads) and 64 (ViT-B/16 and ViT-L/16), at the
token count of 256 px images (256 patches + the class token).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from addp.models import layers

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def qkv(head_dim, dtype, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    return [torch.randn(4, 12, 257, head_dim, generator=g, device="cuda").to(dtype) for _ in range(3)]


@pytest.mark.parametrize("head_dim", [48, 64])
def test_flash_bf16_matches_the_math_path(head_dim):
    q, k, v = qkv(head_dim, torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take these inputs
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with layers.attention_backend("math"):
        math = layers.attention(q, k, v)  # fp32 softmax, rounded to bf16 once
    # bf16 carries 8 significant bits: both sides round the output once, flash also its P @ V inputs
    torch.testing.assert_close(flash.float(), math.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [48, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_sdpa_backend_matches_the_math_path(head_dim, dtype, tol):
    """What the model runs (the sdpa backend, torch picks the kernel) against the math path."""
    q, k, v = qkv(head_dim, dtype, seed=1)
    with layers.attention_backend("sdpa"):
        fused = layers.attention(q, k, v)
    with layers.attention_backend("math"):
        math = layers.attention(q, k, v)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused.float(), math.float(), atol=tol, rtol=tol)


def test_attention_block_under_autocast_matches_fp32():
    """One ViT-B attention layer under bf16 autocast (as generation runs) against fp32."""
    torch.manual_seed(0)
    block = layers.Attention(768, 12).cuda().eval()
    x = torch.randn(2, 257, 768, device="cuda")
    with torch.no_grad():
        ref = block(x)
        with torch.autocast("cuda", torch.bfloat16):
            out = block(x)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
