"""Bad input to the public Python API (`addp.__all__`, `addp.sampling`, `ADDPPipeline`): wrong
types, values and shapes, and models of the wrong kind raise `AddpError` with a one-line
message, never a raw TypeError / AttributeError / IndexError from deep inside."""
import pytest
import torch

import addp
from addp import sampling as S

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """Tiny models, a pipeline, a checkpoint file and a save_pretrained folder."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("api")
    net = addp.create_model("addp_vit_small", depth=1, decoder_depth=1)
    tok = addp.create_model("vqgan_small")
    pred = addp.create_model("mage_vit_small", depth=1, decoder_depth=1)
    file = addp.save_checkpoint(d / "tiny.safetensors", {"addp": net, "tokenizer": tok})
    folder = addp.save_pretrained(d / "folder", {"addp": net, "tokenizer": tok})
    hole = torch.zeros(32, 32, dtype=torch.bool)
    hole[8:16, 8:16] = True
    return dict(net=net, tok=tok, pred=pred, pipe=addp.ADDPPipeline(net, tok), file=file, folder=folder, d=d,
                image=torch.rand(1, 3, 32, 32), hole=hole)


CALLS = {
    # loading
    "load_checkpoint(None)": (lambda a: addp.load_checkpoint(None), "path or a Hub repo id"),
    "load_checkpoint(int)": (lambda a: addp.load_checkpoint(123), "path or a Hub repo id"),
    "load_checkpoint(tensor)": (lambda a: addp.load_checkpoint(torch.zeros(1)), "path or a Hub repo id"),
    "load_components(None)": (lambda a: addp.load_components(None), "path or a Hub repo id"),
    "load_checkpoint(filename=int)": (lambda a: addp.load_checkpoint(a["folder"], filename=3), "filename must be"),
    "load_checkpoint(filename=..)": (lambda a: addp.load_checkpoint(a["folder"], filename="../tiny.safetensors"),
                                     "not a path inside the folder"),
    "load_checkpoint(filename=absolute)": (lambda a: addp.load_checkpoint(a["folder"], filename=str(a["file"])),
                                           "not a path inside the folder"),
    "load_checkpoint(component missing)": (lambda a: addp.load_checkpoint(a["file"], component="predictor"),
                                           "holds no predictor"),
    "from_pretrained(None)": (lambda a: addp.ADDPPipeline.from_pretrained(None), "path or a Hub repo id"),
    "from_pretrained(int)": (lambda a: addp.ADDPPipeline.from_pretrained(7), "path or a Hub repo id"),
    "from_pretrained(tokenizer=int)": (lambda a: addp.ADDPPipeline.from_pretrained(a["file"], tokenizer=5),
                                       "tokenizer must be"),
    # saving
    "save_checkpoint(str model)": (lambda a: addp.save_checkpoint(a["d"] / "x.safetensors", "net"),
                                   "models must be"),
    "save_checkpoint(dict of str)": (lambda a: addp.save_checkpoint(a["d"] / "x.safetensors", {"addp": "net"}),
                                     "cannot save str"),
    "save_checkpoint(torch module)": (lambda a: addp.save_checkpoint(a["d"] / "x.safetensors", torch.nn.Linear(2, 2)),
                                      "cannot save Linear"),
    "save_checkpoint(path None)": (lambda a: addp.save_checkpoint(None, a["net"]), ".safetensors files"),
    "save_pretrained(str model)": (lambda a: addp.save_pretrained(a["d"] / "y", "net"), "models must be"),
    "save_pretrained(torch module)": (lambda a: addp.save_pretrained(a["d"] / "y", torch.nn.Linear(2, 2)),
                                      "cannot save Linear"),
    "pipe.save_pretrained(None)": (lambda a: a["pipe"].save_pretrained(None), "folder path"),
    # models
    "ADDP(str)": (lambda a: addp.ADDP("config"), "ADDP takes an ADDPConfig"),
    "VQTokenizer(None)": (lambda a: addp.VQTokenizer(None), "VQTokenizer takes a VQConfig"),
    "MAGEPredictor(int)": (lambda a: addp.MAGEPredictor(5), "MAGEPredictor takes a PredictorConfig"),
    "create_model(int)": (lambda a: addp.create_model(123), "unknown model"),
    "create_model(depth=-1)": (lambda a: addp.create_model("addp_vit_small", depth=-1), "depth"),
    "tune_for_device(bogus)": (lambda a: addp.tune_for_device("bogus"), "not a device"),
    "tokenizer.encode(str)": (lambda a: a["tok"].encode("images"), "float image tensor"),
    "tokenizer.encode(wrong channels)": (lambda a: a["tok"].encode(torch.rand(1, 1, 32, 32)), "expected images"),
    "tokenizer.decode_ids(out of range)": (lambda a: a["tok"].decode_ids(torch.full((1, 64), 10 ** 6)), "[0, "),
    "tokenizer.decode_ids(negative)": (lambda a: a["tok"].decode_ids(torch.full((1, 64), -1)), "[0, "),
    "tokenizer.decode_ids(float)": (lambda a: a["tok"].decode_ids(torch.zeros(1, 64)), "integer tensor"),
    "tokenizer.decode_ids(7 tokens)": (lambda a: a["tok"].decode_ids(torch.zeros(1, 7, dtype=torch.long)),
                                       "square grid"),
    # sampling
    "generate(str net)": (lambda a: S.generate("net", a["tok"], 1), "net must be an ADDP network"),
    "generate(tokenizer as net)": (lambda a: S.generate(a["tok"], a["tok"], 1), "got a tokenizer model"),
    "generate(predictor as net)": (lambda a: S.generate(a["pred"], a["tok"], 1), "got a predictor model"),
    "generate(net as tokenizer)": (lambda a: S.generate(a["net"], a["net"], 1), "tokenizer must be a VQ tokenizer"),
    "generate(-1 images)": (lambda a: S.generate(a["net"], a["tok"], -1), "num_images"),
    "generate('2' images)": (lambda a: S.generate(a["net"], a["tok"], "2"), "num_images"),
    "generate(batch_size=0)": (lambda a: S.generate(a["net"], a["tok"], 2, batch_size=0), "batch_size"),
    "generate(config=str)": (lambda a: S.generate(a["net"], a["tok"], 1, config="fast"), "SamplerConfig"),
    "generate(steps=0)": (lambda a: S.generate(a["net"], a["tok"], 1, steps=0), "steps"),
    "generate(generator=str)": (lambda a: S.generate(a["net"], a["tok"], 1, generator="seed"), "torch.Generator"),
    "generate(generator=int)": (lambda a: S.generate(a["net"], a["tok"], 1, generator=3), "torch.Generator"),
    "generate(3 generators for 2)": (lambda a: S.generate(a["net"], a["tok"], 2, generator=[torch.Generator()] * 3),
                                     "3 generators for 2"),
    "generate(protocol unknown)": (lambda a: S.generate(a["net"], a["tok"], 1, protocol="nope"), "protocol"),
    "SamplerConfig(top_p=2)": (lambda a: S.SamplerConfig(top_p=2), "top_p"),
    "SamplerConfig(steps='3')": (lambda a: S.SamplerConfig(steps="3"), "steps"),
    # the pipeline
    "ADDPPipeline(str, tokenizer)": (lambda a: addp.ADDPPipeline("net", a["tok"]), "net must be an ADDP network"),
    "ADDPPipeline(tokenizer, tokenizer)": (lambda a: addp.ADDPPipeline(a["tok"], a["tok"]), "got a tokenizer model"),
    "ADDPPipeline(net, net)": (lambda a: addp.ADDPPipeline(a["net"], a["net"]), "tokenizer must be a VQ tokenizer"),
    "pipe(num_images=-1)": (lambda a: a["pipe"](num_images=-1), "num_images"),
    "pipe(generator=str)": (lambda a: a["pipe"](num_images=1, generator="x"), "torch.Generator"),
    "pipe.inpaint(empty batch)": (lambda a: a["pipe"].inpaint(torch.rand(0, 3, 32, 32), a["hole"]), "B, H, W >= 1"),
    "pipe.inpaint(int64 image)": (lambda a: a["pipe"].inpaint(torch.zeros(1, 3, 32, 32, dtype=torch.long), a["hole"]),
                                  "float in [0, 1] or uint8"),
    "pipe.inpaint(2-d image)": (lambda a: a["pipe"].inpaint(torch.rand(32, 32), a["hole"]), "(3, H, W)"),
    "pipe.inpaint(mask of another size)": (lambda a: a["pipe"].inpaint(a["image"], torch.ones(5, 5, dtype=torch.bool)),
                                           "differs from image size"),
    "pipe.inpaint(mask None)": (lambda a: a["pipe"].inpaint(a["image"], None), "mask must be"),
    "pipe.outpaint(str margin)": (lambda a: a["pipe"].outpaint(a["image"], left="3"), "margins"),
    "pipe.outpaint(huge margin)": (lambda a: a["pipe"].outpaint(a["image"], left=10 ** 9), "at most"),
    "from_pretrained(device=bogus)": (lambda a: addp.ADDPPipeline.from_pretrained(a["file"], device="bogus"),
                                      "not a device"),
    "from_pretrained(device=int)": (lambda a: addp.ADDPPipeline.from_pretrained(a["file"], device=3),
                                    "string or torch.device"),
    "pipe.to(bogus)": (lambda a: a["pipe"].to("bogus"), "not a device"),
    "pipe.to(xla)": (lambda a: a["pipe"].to("xla"), "unsupported device type"),
    "pipe.uncrop(nan)": (lambda a: a["pipe"].uncrop(a["image"], float("nan")), "scale"),
}


@pytest.mark.parametrize("name", CALLS)
def test_bad_api_input_is_one_addp_error(api, name):
    call, match = CALLS[name]
    with pytest.raises(addp.AddpError) as e:
        call(api)
    message = str(e.value)
    assert match in message and "\n" not in message.strip(), message


def test_good_input_still_works(api):
    """The checks above refuse only what is wrong: the same calls with good input run."""
    images = S.generate(api["net"], api["tok"], 2, batch_size=1, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    uint8 = (api["image"] * 255).to(torch.uint8)
    assert api["pipe"].inpaint(uint8, api["hole"], num_inference_steps=2).shape == (1, 3, 32, 32)
    assert addp.load_checkpoint(api["folder"]).config.kind == "addp"
