"""diffusers loads our save_pretrained folders (`addp.sampling.diffusers_pipeline`) and gives
the images ADDPPipeline gives; the folders stay readable by ADDPPipeline, old ones included."""
import json
import os
import subprocess
import sys

import pytest
import torch

import addp
from addp.sampling.pipeline import ADDPPipeline

diffusers = pytest.importorskip("diffusers")
from addp.sampling.diffusers_pipeline import ADDPDiffusionPipeline, ADDPModel, VQTokenizerModel  # noqa: E402

STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def images(p, seed=0, **kwargs):
    return p(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
             output_type="pt", **kwargs).images


def load(folder, **kwargs):
    return diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, low_cpu_mem_usage=False,
                                                       **kwargs)


def test_diffusers_loads_our_folder_and_gives_our_images(tmp_path, pipe, modules_cache):
    folder = pipe.save_pretrained(tmp_path / "addp-digits")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["addp_pipeline", "ADDPDiffusionPipeline"]
    loaded = load(folder)
    assert type(loaded) is ADDPDiffusionPipeline
    assert isinstance(loaded.addp, ADDPModel) and isinstance(loaded.tokenizer, VQTokenizerModel)
    assert set(loaded.components) == {"addp", "tokenizer"}
    assert torch.equal(images(loaded), images(pipe))
    assert torch.equal(images(loaded, seed=1, max_batch_size=1), images(pipe, seed=1, max_batch_size=1))
    ours = ADDPPipeline.from_pretrained(folder, device="cpu")  # the same folder, our reader
    assert torch.equal(images(ours), images(pipe))


def test_diffusers_needs_trust_remote_code_for_the_pipeline_file(tmp_path, pipe, modules_cache):
    folder = pipe.save_pretrained(tmp_path / "addp-digits")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        diffusers.DiffusionPipeline.from_pretrained(folder)


def test_diffusers_torch_dtype_and_refused_keywords(tmp_path, pipe, modules_cache):
    folder = pipe.save_pretrained(tmp_path / "addp-digits")
    half = load(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.tokenizer.model.codebook.dtype == torch.bfloat16
    with pytest.raises(addp.AddpError, match="use_safetensors=False"):
        load(folder, use_safetensors=False)
    with pytest.raises(addp.AddpError, match="device_map='cpu' is not supported"):
        ADDPModel.from_pretrained(folder, subfolder="addp", device_map="cpu")
    with pytest.raises(addp.AddpError, match="not the addp of ADDPModel"):
        ADDPModel.from_pretrained(folder, subfolder="tokenizer")
    with pytest.raises(addp.AddpError, match="takes no keyword argument 'foo'"):
        VQTokenizerModel.from_pretrained(folder, subfolder="tokenizer", foo=1)


def test_a_folder_written_before_the_diffusers_entry_still_loads(tmp_path, pipe):
    folder = pipe.save_pretrained(tmp_path / "old")
    (folder / "addp_pipeline.py").unlink()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "ADDPPipeline", "_addp_version": "0.1.0",
        "addp": ["addp", "ADDP"], "tokenizer": ["addp", "VQTokenizer"]}))
    assert torch.equal(images(ADDPPipeline.from_pretrained(folder, device="cpu")), images(pipe))


def test_the_diffusers_pipeline_is_addps_on_the_same_modules(tmp_path, pipe, modules_cache):
    wrapped = ADDPDiffusionPipeline.from_addp(pipe)
    assert wrapped.addp.model is pipe.net and wrapped.device == pipe.device
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hole = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    hole[..., 8:24, 8:24] = True
    filled = [p.inpaint(image, hole, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3))
              for p in (pipe, wrapped)]
    assert torch.equal(*filled)
    folder = wrapped.save_pretrained(tmp_path / "from-diffusers")
    assert torch.equal(images(load(folder)), images(pipe))
    with pytest.raises(addp.AddpError, match="enable_model_cpu_offload is not supported"):
        wrapped.enable_model_cpu_offload()
    with pytest.raises(addp.AddpError, match="safe_serialization=False"):
        wrapped.save_pretrained(tmp_path / "x", safe_serialization=False)
    wrapped.set_progress_bar_config(desc="digits", disable=True)
    assert wrapped.pipeline.progress_bar(total=2).desc == "digits"
    with pytest.raises(addp.AddpError, match="not 'leave'"):
        wrapped.set_progress_bar_config(leave=False)
    seen = []
    wrapped(batch_size=1, num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: seen.append(p.net))
    assert seen == [pipe.net, pipe.net]


def test_a_component_saves_the_folder_our_reader_reads(tmp_path, pipe):
    ADDPModel(pipe.net).save_pretrained(tmp_path / "addp")
    loaded = ADDPModel.from_pretrained(tmp_path / "addp")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), pipe.net.state_dict().values()))
    from addp.models.checkpoint import load_component  # the same files through addp's own reader
    assert load_component(tmp_path / "addp").config == pipe.net.config
    with pytest.raises(addp.AddpError, match="holds an addp tokenizer model"):
        VQTokenizerModel(pipe.net)


def test_import_addp_does_not_import_diffusers_and_its_absence_is_one_line():
    code = ("import sys, addp\n"
            "assert 'diffusers' not in sys.modules\n"
            "sys.modules['diffusers'] = None\n"
            "try:\n    import addp.sampling.diffusers_pipeline\n"
            "except addp.AddpError as e:\n    print(e)\n")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("addp's diffusers pipeline needs diffusers, which is not installed: "
                                  'pip install "addp[diffusers]"')


def test_diffusers_loads_a_hub_repo_of_our_folder(tmp_path, pipe, hub_cache, modules_cache):
    folder = pipe.save_pretrained(tmp_path / "addp-digits")
    hub_cache("someone/addp-digits", {".": folder})
    loaded = load("someone/addp-digits")
    assert type(loaded) is ADDPDiffusionPipeline and torch.equal(images(loaded), images(pipe))
