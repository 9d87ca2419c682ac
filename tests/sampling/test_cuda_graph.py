"""The CUDA-graph sampler: same images as the eager sampler, and clear errors off CUDA."""
import contextlib
import types

import pytest
import torch

import addp
from addp import sampling as S

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device; this machine has none")


@pytest.fixture(scope="module")
def cpu_models():
    torch.manual_seed(0)
    return addp.create_model("addp_vit_small").eval(), addp.create_model("vqgan_small").eval()


@pytest.fixture
def cuda_models(cpu_models):
    net, tok = (m.cuda() for m in cpu_models)
    S.clear_cache(net)  # graphs captured by an earlier test read the parameters it moved away
    yield net, tok
    net.cpu(), tok.cpu()


def test_cuda_graph_off_cuda_is_an_error(cpu_models):
    with pytest.raises(ValueError, match="CUDA device"):
        S.generate(*cpu_models, 2, S.SamplerConfig(steps=2), cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        S.CudaGraphSampler(*cpu_models, 2, S.SamplerConfig(steps=2))


class _CpuGraph:
    """Stands in for torch.cuda.CUDAGraph: capture runs the function eagerly, replay does nothing."""
    def register_generator_state(self, generator):
        pass

    def replay(self):
        pass


@pytest.fixture
def graph_api_on_cpu(monkeypatch):
    """torch's CUDA stream/graph calls replaced by CPU stand-ins, and torch.Generator("cuda")
    by a CPU generator: the sampler's capture code runs as it would on a GPU."""
    cpu_generator = torch.Generator
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _CpuGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kw: contextlib.nullcontext())
    monkeypatch.setattr(torch, "Generator", lambda device=None: cpu_generator())


def test_capture_runs_with_the_autocast_weight_cache_off(graph_api_on_cpu):
    """The cached low-precision weight copies of autocast are freed when its block exits; a
    graph captured with them reads freed memory on every later replay."""
    seen = []

    class Recording(S.CudaGraphSampler):
        def _run(self):  # the captured work: note autocast's state while it runs
            seen.append((torch.is_autocast_enabled("cuda"), torch.is_autocast_cache_enabled()))
            return torch.zeros(1)

    net = types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda", 0))]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache flag is shared by every device type
        Recording(net, None, 2, S.SamplerConfig(steps=2))
        assert torch.is_autocast_cache_enabled()  # the caller's setting is back
    assert [cache for _, cache in seen] == [False, False]  # warm-up and capture


def test_generate_cli_cuda_graph_on_cpu_is_one_line_error(cpu_models, tmp_path, capsys):
    from addp import generate
    ckpt = addp.save_checkpoint(tmp_path / "m.safetensors", {"addp": cpu_models[0], "tokenizer": cpu_models[1]})
    code = generate.cli(["--checkpoint", str(ckpt), "--num-images", "2", "--batch-size", "2", "--steps", "2",
                         "--device", "cpu", "--cuda-graph", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("parity", [False, True])
def test_graph_replay_equals_eager_bitwise(cuda_models, parity):
    net, tok = cuda_models
    config = S.SamplerConfig(steps=5, temperature=2.0, parity=parity)
    for seed in (0, 1):  # the second seed replays the graph captured for the first
        g_eager = torch.Generator("cuda").manual_seed(seed)
        g_graph = torch.Generator("cuda").manual_seed(seed)
        eager = S.generate(net, tok, 6, config, generator=g_eager, batch_size=3, cuda_graph=False)
        graph = S.generate(net, tok, 6, config, generator=g_graph, batch_size=3, cuda_graph=True)
        assert torch.equal(eager, graph)
        # the caller's generator advanced exactly as in eager sampling
        assert torch.equal(torch.rand(4, generator=g_eager, device="cuda"),
                           torch.rand(4, generator=g_graph, device="cuda"))


@pytest.mark.cuda
@needs_cuda
def test_bf16_graph_replays_after_its_autocast_block_closed(cuda_models):
    """Captured under bf16 autocast, replayed after the block has exited and the allocator has
    handed its memory out again (filled with NaN): the same images as eager bf16 sampling."""
    net, tok = cuda_models
    config = S.SamplerConfig(steps=4, temperature=2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sampler = S.CudaGraphSampler(net, tok, 3, config)
    torch.cuda.empty_cache()
    junk = [torch.full((n,), float("nan"), device="cuda") for n in (1 << k for k in range(8, 24)) for _ in range(4)]
    replayed = [sampler(torch.Generator("cuda").manual_seed(seed)) for seed in (0, 1)]
    del junk
    for seed, graph in zip((0, 1), replayed):
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            eager = S.sample_batch(net, tok, 3, config, torch.Generator("cuda").manual_seed(seed))
        assert torch.equal(graph, eager)


@pytest.mark.cuda
@needs_cuda
def test_default_on_cuda_uses_the_graph_and_global_rng(cuda_models):
    net, tok = cuda_models
    config = S.SamplerConfig(steps=3)
    torch.cuda.manual_seed(5)
    a = S.generate(net, tok, 2, config)  # graph by default on CUDA
    torch.cuda.manual_seed(5)
    b = S.generate(net, tok, 2, config, cuda_graph=False)
    assert torch.equal(a, b)
    assert any(k[0] == "graph" for k in S._cache(net))


@pytest.mark.cuda
@needs_cuda
def test_autocast_state_gets_its_own_graph(cuda_models):
    net, tok = cuda_models
    config = S.SamplerConfig(steps=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        S.generate(net, tok, 2, config, cuda_graph=True)
    fp32 = S.generate(net, tok, 2, config, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=True)
    eager = S.generate(net, tok, 2, config, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=False)
    assert torch.equal(fp32, eager)  # not the bf16 graph replayed
    assert sum(k[0] == "graph" and k[2] == 2 for k in S._cache(net)) == 2


@pytest.mark.cuda
@needs_cuda
def test_cpu_generator_seeds_the_graph(cuda_models):
    """A CPU generator seeds the graph's private generator with one draw of its own."""
    net, tok = cuda_models
    config = S.SamplerConfig(steps=4, temperature=2.0)
    graph = S.generate(net, tok, 3, config, generator=torch.Generator().manual_seed(7), cuda_graph=True)
    seed = int(torch.randint(2 ** 63 - 1, (), generator=torch.Generator().manual_seed(7)))
    eager = S.generate(net, tok, 3, config, generator=torch.Generator("cuda").manual_seed(seed), cuda_graph=False)
    assert torch.equal(graph, eager)


@pytest.mark.cuda
@needs_cuda
def test_cpu_generator_with_the_model_on_cuda_draws_on_the_cpu(cuda_models, cpu_models):
    """Eager: the noise comes from the CPU generator (drawn there, moved), as on a CPU model."""
    net, tok = cuda_models
    config = S.SamplerConfig(steps=3)
    g_cuda_model, g_cpu_model = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    a = S.generate(net, tok, 2, config, generator=g_cuda_model, cuda_graph=False)
    b = S.generate(net, tok, 2, config, generator=torch.Generator().manual_seed(2), cuda_graph=False)
    assert a.is_cuda and torch.equal(a, b)
    net.cpu(), tok.cpu()
    try:
        S.generate(net, tok, 2, config, generator=g_cpu_model)
    finally:
        net.cuda(), tok.cuda()
    # the CPU generator advanced by exactly the draws of the CPU run
    assert torch.equal(torch.rand(4, generator=g_cuda_model), torch.rand(4, generator=g_cpu_model))


@pytest.mark.cuda
@needs_cuda
def test_pipeline_with_a_cpu_generator_on_cuda(cuda_models):
    from addp.sampling.pipeline import ADDPPipeline
    pipe = ADDPPipeline(*cuda_models)
    images = pipe(num_images=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.is_cuda and images.shape == (2, 3, 32, 32)
    per_image = pipe(num_images=2, num_inference_steps=3, output_type="pt",
                     generator=[torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(1)]).images
    assert per_image.shape == (2, 3, 32, 32)


@pytest.mark.cuda
@needs_cuda
def test_eager_only_options_with_cuda_graph_are_errors(cuda_models):
    net, tok = cuda_models
    config = S.SamplerConfig(steps=2)
    with pytest.raises(ValueError, match="list"):
        S.generate(net, tok, 2, config, generator=[torch.Generator("cuda"), torch.Generator("cuda")], cuda_graph=True)
    with pytest.raises(ValueError, match="callback"):
        S.generate(net, tok, 2, config, callback=lambda i, step, state: None, cuda_graph=True)
