"""diffusers' conventions on ADDPPipeline: its from_pretrained / save_pretrained keywords, the
number of images of a call (batch_size), progress bars, components and offloading."""
import io
import warnings

import pytest
import torch

import addp
from addp import sampling as S
from addp.sampling.pipeline import ADDPPipeline

STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("pretrained") / "pipe")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- from_pretrained keywords
@pytest.mark.parametrize("kwargs", [
    {"torch_dtype": torch.bfloat16}, {"torch_dtype": None}, {"variant": None}, {"use_safetensors": True},
    {"use_safetensors": None}, {"token": "hf_unused"}, {"token": False}, {"local_files_only": True},
    {"cache_dir": "unused-cache"}, {"revision": "main"},
])
def test_from_pretrained_takes_diffusers_keywords(folder, pipe, kwargs):
    loaded = ADDPPipeline.from_pretrained(folder, device="cpu", **kwargs)
    dtype = kwargs.get("torch_dtype") or torch.float32
    assert loaded.dtype == dtype and loaded.tokenizer.codebook.dtype == dtype
    ref = {k: v.to(dtype) for k, v in pipe.net.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in loaded.net.state_dict().items())


@pytest.mark.parametrize("kwargs,expected", [
    ({"variant": "fp16"}, "variant='fp16': addp folders hold one model.safetensors"),
    ({"use_safetensors": False}, "use_safetensors=False"),
    ({"torch_dtype": "float16"}, "torch_dtype must be a floating torch.dtype"),
    ({"torch_dtype": torch.int8}, "torch_dtype must be a floating torch.dtype"),
    ({"device_map": "auto"}, "takes no keyword argument 'device_map'"),
    ({"force_download": True}, "takes no keyword argument 'force_download'"),
    ({"low_cpu_mem_usage": False}, "takes no keyword argument 'low_cpu_mem_usage'"),
])
def test_from_pretrained_refuses_the_others_in_one_line(folder, kwargs, expected):
    with pytest.raises(addp.AddpError) as e:
        ADDPPipeline.from_pretrained(folder, device="cpu", **kwargs)
    assert expected in one_line(e)


def test_use_safetensors_refuses_a_pytorch_file(tmp_path):
    path = tmp_path / "addp-vit-base-16.pth"
    with pytest.raises(addp.AddpError, match="is not a safetensors file") as e:
        ADDPPipeline.from_pretrained(path, use_safetensors=True)
    one_line(e)


# --------------------------------------------------------------------------- save_pretrained keywords
def test_save_pretrained_takes_safe_serialization(tmp_path, pipe, folder):
    out = pipe.save_pretrained(tmp_path / "again", safe_serialization=True, variant=None, push_to_hub=False)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (folder / f).read_bytes() for f in written if f != "model_index.json")


@pytest.mark.parametrize("kwargs,expected", [
    ({"safe_serialization": False}, "safe_serialization=False: addp writes only safetensors files"),
    ({"variant": "fp16"}, "variant='fp16'"),
    ({"max_shard_size": "5GB"}, "save_pretrained takes no keyword argument 'max_shard_size'"),
    ({"repo_id": "me/x"}, "save_pretrained takes no keyword argument 'repo_id'"),
    ({"push_to_hub": True, "max_shard_size": "5GB"}, "takes no keyword argument 'max_shard_size'"),
])
def test_save_pretrained_refuses_the_others_in_one_line(tmp_path, pipe, kwargs, expected):
    with pytest.raises(addp.AddpError) as e:
        pipe.save_pretrained(tmp_path / "out", **kwargs)
    assert expected in one_line(e)
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_hub_is_one_line(tmp_path, pipe, hub_cache):
    with pytest.raises(addp.CheckpointError, match="cannot upload .* to the Hub repo someone/addp-digits") as e:
        pipe.save_pretrained(tmp_path / "addp-digits", push_to_hub=True, repo_id="someone/addp-digits")
    one_line(e)
    assert ADDPPipeline.from_pretrained(tmp_path / "addp-digits", device="cpu")  # written before the upload


# --------------------------------------------------------------------------- batch_size = the number of images
def test_batch_size_is_the_number_of_images(pipe):
    two = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
    assert two.shape == (2, 3, 32, 32)
    assert len(pipe(2, num_inference_steps=STEPS).images) == 2
    alias = pipe(num_images=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
    both = pipe(batch_size=2, num_images=2, num_inference_steps=STEPS, generator=gen(0), output_type="pt").images
    ref = S.generate(pipe.net, pipe.tokenizer, 2, S.SamplerConfig(steps=STEPS), generator=gen(0))
    assert torch.equal(two, ref) and torch.equal(alias, ref) and torch.equal(both, ref)


def test_batch_size_below_num_images_is_the_deprecated_chunk_size(pipe):
    with pytest.warns(FutureWarning, match="pass max_batch_size=2"):
        old = pipe(num_images=3, batch_size=2, num_inference_steps=STEPS, generator=gen(1), output_type="pt").images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = pipe(batch_size=3, max_batch_size=2, num_inference_steps=STEPS, generator=gen(1), output_type="pt").images
    ref = S.generate(pipe.net, pipe.tokenizer, 3, S.SamplerConfig(steps=STEPS), generator=gen(1), batch_size=2)
    assert old.shape == (3, 3, 32, 32) and torch.equal(old, ref) and torch.equal(new, ref)


@pytest.mark.parametrize("kwargs", [{"batch_size": 3, "num_images": 2},
                                    {"batch_size": 1, "num_images": 3, "max_batch_size": 1}])
def test_differing_counts_are_one_line(pipe, kwargs):
    with pytest.raises(addp.AddpError, match="both name the number of images") as e:
        pipe(num_inference_steps=STEPS, **kwargs)
    one_line(e)


# --------------------------------------------------------------------------- progress, components, offload
def test_progress_bar_follows_its_config(pipe):
    log = io.StringIO()
    pipe.set_progress_bar_config(desc="digits", mode="lines", file=log)
    try:
        pipe(batch_size=3, max_batch_size=2, num_inference_steps=STEPS, progress=True)
        assert log.getvalue().splitlines()[-1].startswith("digits: img 3/3 (100%)")
        bar = pipe.progress_bar(range(4))
        assert list(bar) == [0, 1, 2, 3] and bar.n == 4 and bar.desc == "digits"
    finally:
        pipe.set_progress_bar_config()
    with pytest.raises(addp.AddpError, match="not 'leave'") as e:
        pipe.set_progress_bar_config(leave=False)
    one_line(e)
    with pytest.raises(addp.AddpError, match="an iterable or a total"):
        pipe.progress_bar()


def test_components_rebuild_the_pipeline(pipe):
    assert pipe.components == {"net": pipe.net, "tokenizer": pipe.tokenizer}
    again = ADDPPipeline(**pipe.components)
    assert again.net is pipe.net and again.tokenizer is pipe.tokenizer


def test_model_cpu_offload_is_refused_in_one_line(pipe):
    with pytest.raises(addp.AddpError, match="enable_model_cpu_offload is not supported") as e:
        pipe.enable_model_cpu_offload()
    one_line(e)
