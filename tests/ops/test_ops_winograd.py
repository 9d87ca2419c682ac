"""3x3 convolution by Winograd F(4x4, 3x3): the CPU kernel against F.conv2d computed in float64
(random shapes, channel counts, borders, layouts, ISAs, thread counts), the routing (autograd,
autocast, other dtypes, wide layers), and the VQ layer that keeps its transformed weight."""
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_c

from addp import ops
from addp.ops import winograd_conv
from addp.models.tokenizer import Conv3x3

# Largest difference from the float64 convolution allowed, relative to the largest |output|.
# The transforms' rounding: measured 4e-6 to 8e-6 on these cases; float32 direct convolution
# (oneDNN) is about 6e-7.
TOL = 2e-5


def _random_case(g):
    C, K = (4 * int(c) for c in torch.randint(1, 33, (2,), generator=g))
    H, W = (int(s) for s in torch.randint(1, 30, (2,), generator=g))
    N = int(torch.randint(1, 4, (), generator=g))
    x = torch.randn(N, C, H, W, generator=g) * float(torch.rand((), generator=g) * 3 + 0.1)
    weight = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)
    bias = torch.randn(K, generator=g) if bool(torch.rand((), generator=g) < 0.5) else None
    return x, weight, bias


def _rel_error(out, x, weight, bias):
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


@needs_c
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_kernel_equals_the_float64_convolution(isa, monkeypatch):
    """Every ISA path (the widest the CPU has when a narrower one is not asked for), borders
    of every remainder mod 4, channel counts that are multiples of 4, 8 and 16 or not."""
    monkeypatch.setenv("ADDP_CPU_ISA", isa)
    g = torch.Generator().manual_seed(11)
    for _ in range(12):
        x, weight, bias = _random_case(g)
        out = torch.ops.addp.conv3x3_winograd(x, ops.winograd_weight(weight), bias)
        assert out.shape == (x.shape[0], weight.shape[0], *x.shape[2:])
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert _rel_error(out, x, weight, bias) <= TOL, (tuple(x.shape), tuple(weight.shape))


@needs_c
def test_the_residual_is_added_as_the_output_is_written():
    """conv + residual against the float64 sum, for residuals in either layout; the kernel's
    sum equals its own convolution plus the residual added afterwards to the last bit."""
    g = torch.Generator().manual_seed(12)
    for i in range(6):
        x, weight, bias = _random_case(g)
        residual = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:], generator=g)
        if i % 2:
            residual = residual.contiguous(memory_format=torch.channels_last)
        u = ops.winograd_weight(weight)
        out = torch.ops.addp.conv3x3_winograd(x, u, bias, residual)
        exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
        exact = exact + residual.double()
        assert ((out.double() - exact).abs().max() / exact.abs().max()).item() <= TOL
        torch.testing.assert_close(out, torch.ops.addp.conv3x3_winograd(x, u, bias) + residual, rtol=0, atol=0)


@needs_c
def test_the_upsampled_input_is_read_in_place():
    """upsample=True against the float64 convolution of the nearest-upsampled input: odd and
    even sizes (output sizes 2 mod 4 and 0 mod 4), both layouts, with and without a residual."""
    g = torch.Generator().manual_seed(13)
    for i in range(6):
        x, weight, bias = _random_case(g)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
        residual = torch.randn(x.shape[0], weight.shape[0], *up.shape[2:], generator=g) if i % 3 == 0 else None
        out = torch.ops.addp.conv3x3_winograd(x, ops.winograd_weight(weight), bias, residual, True)
        exact = F.conv2d(up, weight.double(), None if bias is None else bias.double(), padding=1)
        if residual is not None:
            exact = exact + residual.double()
        assert out.shape == exact.shape
        assert ((out.double() - exact).abs().max() / exact.abs().max()).item() <= TOL, (tuple(x.shape), i)
    x, w = torch.randn(1, 8, 3, 5, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    torch.testing.assert_close(ops.conv3x3(x, w, upsample=True, backend="reference"),
                               F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1))


@needs_c
def test_a_residual_of_the_wrong_shape_is_refused():
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    with pytest.raises(RuntimeError, match="residual must be a float32 tensor of the output's shape"):
        torch.ops.addp.conv3x3_winograd(x, ops.winograd_weight(w), None, torch.randn(1, 8, 5, 4))


@needs_c
def test_the_vq_layer_shapes():
    """The widths and sizes of the official-layout benchmark's decoder (ch=32), a few rows."""
    g = torch.Generator().manual_seed(3)
    for C, K, H in [(128, 128, 16), (128, 64, 32), (64, 64, 64), (64, 32, 128), (32, 32, 256)]:
        x = torch.randn(1, C, H, 12, generator=g)
        weight = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)
        out = ops.conv3x3(x, weight, None)
        assert _rel_error(out, x, weight, None) <= TOL, (C, K, H)


@needs_c
def test_opcheck():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(2, 8, 7, 9, generator=g), torch.randn(12, 8, 3, 3, generator=g)
    residual = torch.randn(2, 12, 7, 9, generator=g)
    for bias, res in ((None, None), (torch.randn(12, generator=g), None), (None, residual)):
        torch.library.opcheck(torch.ops.addp.conv3x3_winograd.default, (x, ops.winograd_weight(w), bias, res))
    torch.library.opcheck(torch.ops.addp.conv3x3_winograd.default,
                          (x, ops.winograd_weight(w), None, torch.randn(2, 12, 14, 18, generator=g), True))


@needs_c
def test_layouts_and_thread_counts_give_the_same_bits(one_thread):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 19, 22, generator=g)
    weight, bias = torch.randn(16, 24, 3, 3, generator=g), torch.randn(16, generator=g)
    u = ops.winograd_weight(weight)
    one = torch.ops.addp.conv3x3_winograd(x, u, bias)
    torch.set_num_threads(2)
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, :].clone()):
        torch.testing.assert_close(torch.ops.addp.conv3x3_winograd(layout, u, bias), one, rtol=0, atol=0)


@needs_c
def test_nonfinite_inputs_stay_in_their_neighbourhood():
    """An inf in the input makes non-finite only the outputs whose 3x3 window sees it, plus the
    rest of their 4x4 output tile (the transforms mix a tile); the other tiles are exact."""
    x = torch.randn(1, 8, 16, 16)
    x[0, 3, 9, 6] = float("inf")
    weight = torch.randn(8, 8, 3, 3)
    out = ops.conv3x3(x, weight, None)
    bad = ~out.isfinite()
    assert bad[0, :, 8:11, 5:8].all()
    tile = torch.zeros_like(bad)
    tile[0, :, 8:12, 4:8] = True  # the 4x4 output tile holding those outputs
    assert not (bad & ~tile).any()


def test_what_the_kernel_does_not_take_runs_the_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 7, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g)
    for args in [(x.double(), w.double()), (x[:, :6], w[:, :6]), (x, torch.randn(3, 8, 3, 3)),
                 (torch.randn(1, 132, 4, 4), torch.randn(4, 132, 3, 3))]:
        assert not winograd_conv.kernel_applies(*args)
        torch.testing.assert_close(ops.conv3x3(*args), F.conv2d(*args, padding=1), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd_conv.uses_kernel(x, w, backend="cpu" if ops.has_compiled_ops() else None)
        assert ops.conv3x3(x, w).dtype == torch.bfloat16


def test_gradients_run_the_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, generator=g, requires_grad=True)
    r = torch.randn(2, 8, 6, 6, generator=g, requires_grad=True)
    ops.conv3x3(x, w, residual=r).square().sum().backward()
    x2, w2, r2 = (t.detach().requires_grad_(True) for t in (x, w, r))
    (F.conv2d(x2, w2, padding=1) + r2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(r.grad, r2.grad)
    assert not winograd_conv.kernel_applies(x.detach(), w.detach(), r)  # the residual alone needs one
    with torch.no_grad():
        assert winograd_conv.kernel_applies(x.detach(), w.detach(), r)


@needs_c
def test_the_layer_rebuilds_its_transformed_weight_when_the_weight_changes():
    torch.manual_seed(0)
    conv = Conv3x3(8, 8).eval()
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        first = conv(x)
        assert _rel_error(first, x, conv.weight, conv.bias) <= TOL
        conv.weight.mul_(-2)  # in place: the same storage, a new version
        assert _rel_error(conv(x), x, conv.weight, conv.bias) <= TOL
        conv.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.zeros(8)})
        assert _rel_error(conv(x), x, conv.weight, conv.bias) <= TOL
    assert set(conv.state_dict()) == {"weight", "bias"}


@needs_c
def test_a_forced_reference_backend_runs_direct_convolutions(monkeypatch):
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    assert winograd_conv.uses_kernel(x, w)
    monkeypatch.setenv("ADDP_OPS_BACKEND", "reference")
    assert not winograd_conv.uses_kernel(x, w)
    torch.testing.assert_close(ops.conv3x3(x, w), F.conv2d(x, w, padding=1), rtol=0, atol=0)


@needs_c
def test_compiled_layer_equals_eager():
    torch.manual_seed(1)
    conv = Conv3x3(8, 16).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(conv)(x), conv(x), rtol=1e-5, atol=1e-5)
