"""Shared fixtures and helpers of the tests (import helpers with ``from conftest import ...``)."""
import os
from pathlib import Path

import pytest
import torch

import addp
from addp.ops import has_compiled_ops

# Commands the tests start in subprocesses (`python -m addp...`, torchrun workers) import the same
# copy of the package as this process, whatever their working folder and however it was installed.
_PACKAGE_ROOT = str(Path(addp.__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def one_thread():
    """Tiny models on two shared cores: spin-waiting OpenMP threads only slow them down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- fused ops
needs_c = pytest.mark.skipif(not has_compiled_ops(), reason="addp._C is not built (pip install --no-build-isolation -e .)")


def assert_close(actual, expected, atol, rtol):
    """Elementwise |a - e| <= atol + rtol * |e| (NaN must match NaN); names the worst index."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.float(), expected.float()
    nan_ok = torch.isnan(a) == torch.isnan(e)
    excess = ((a - e).abs() - (atol + rtol * e.abs())).nan_to_num(nan=0.0)
    excess = torch.where(nan_ok, excess, torch.full_like(excess, float("inf")))
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        bad = int((excess > 0).sum())
        pytest.fail(f"{bad}/{excess.numel()} elements differ; worst at {idx}: got {a[idx].item()!r}, "
                    f"expected {e[idx].item()!r} (atol={atol}, rtol={rtol})")


def assert_same(a, b):
    """Two (ids, mask) results of gumbel_topk_unmask are identical; counts the differences."""
    (ia, ma), (ib, mb) = a, b
    assert ia.dtype == ib.dtype == torch.int64 and ma.dtype == mb.dtype == torch.bool
    bad_ids, bad_mask = int((ia != ib).sum()), int((ma != mb).sum())
    assert bad_ids == 0 and bad_mask == 0, f"{bad_ids} ids and {bad_mask} mask entries differ of {ia.numel()}"


LAYOUTS = ["contig", "transposed", "strided_v", "sliced"]


def make_logits(B, L, V, layout="contig", generator=None, scale=1.0, dtype=torch.float32):
    """(B, L, V) random logits with the given memory layout:
    contig; transposed (leading dims swapped: (L, B, V) viewed as (B, L, V)); strided_v (last dim
    not unit-stride); sliced (an offset view of a wider tensor with a step on the last dim)."""
    g = generator
    if layout == "contig":
        x = torch.randn(B, L, V, generator=g)
    elif layout == "transposed":
        x = torch.randn(L, B, V, generator=g).transpose(0, 1)
    elif layout == "strided_v":
        x = torch.randn(B, V, L, generator=g).permute(0, 2, 1)
    elif layout == "sliced":
        x = torch.randn(B, L + 1, 2 * V + 3, generator=g)[:, 1:, 3::2]
    else:
        raise ValueError(layout)
    return (x * scale).to(dtype)


def make_inputs(B, L, K, D, V, layout="contig", masked=True, dtype=torch.float32, cb_dtype=None, seed=0):
    """Inputs of codebook_weighted_sum: logits (B, L, V), codebook (K, D), ids and mask (B, L) or None."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(B, L, V, layout, g, 2.5, dtype)
    codebook = torch.randn(K, D, generator=g).to(cb_dtype or dtype)
    ids = mask = None
    if masked:
        ids = torch.randint(0, K, (B, L), generator=g)
        mask = torch.rand(B, L, generator=g) < 0.5
    return logits, codebook, ids, mask


def make_unmask_inputs(B, L, K, dtype=torch.float32, layout="contig", p_mask=0.6, seed=0, scale=3.0):
    """Inputs of gumbel_topk_unmask: logits (B, L, K), ids (B, L) int64, mask (B, L) bool."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(B, L, K, layout, g, scale, dtype)
    ids = torch.randint(0, K, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < p_mask
    return logits, ids, mask


def make_loss_inputs(B, L, V, K, dtype=torch.float32, t_dtype=None, layout="contig", p_mask=0.5, seed=0):
    """Inputs of soft_target_cross_entropy: logits (B, L, V), target (B, L, K) probabilities, mask (B, L)."""
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(B, L, V, layout, g, 3.0, dtype)
    target = torch.softmax(torch.randn(B, L, K, generator=g) * 2, -1).to(t_dtype or dtype)
    mask = torch.rand(B, L, generator=g) < p_mask
    return logits, target, mask


# -- command-line entry points -----------------------------------------------------------
# `addp.train` options of a run folder that trains each stage for 2 steps
TINY = ("--tokenizer-steps", "2", "--predictor-steps", "2", "--steps", "2", "--batch-size", "8",
        "--num-samples", "0", "--log-every", "1", "--warmup-steps", "0")


def one_error_line(capsys) -> str:
    """The one `error:` line a failed command printed last (progress bars may precede it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


ENTRY_POINTS = ("addp", "addp.train", "addp.finetune", "addp.generate", "addp.inpaint", "addp.visualize",
                "addp.evaluate", "addp.export")


def _run_module(module: str, argv: list, out: str, err: str) -> None:
    """Child body: what `python -m module *argv` does, stdout/stderr going to the files."""
    import os
    import runpy
    import sys
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [module, *argv]
    sys.modules.pop(module if module != "addp" else "addp.__main__", None)  # run as __main__, not as an import
    runpy.run_module(module, run_name="__main__", alter_sys=True)


@pytest.fixture(scope="session")
def run_module(tmp_path_factory):
    """`run_module("addp.generate", [...])` -> (exit code, stdout, stderr) of the entry point run
    in its own process, as `python -m` runs it: a child forked from a server that imported the
    package once (each plain `python -m addp.X` spends seconds importing torch and timm).
    The server itself never runs torch ops, so forking it is safe."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in ENTRY_POINTS if m != "addp"] + ["addp.__main__", "conftest"])
    logs = tmp_path_factory.mktemp("cli_logs")
    count = iter(range(10 ** 6))

    def run(module: str, argv: list, timeout: float = 300) -> tuple[int, str, str]:
        n = next(count)
        out, err = logs / f"{n}.out", logs / f"{n}.err"
        proc = ctx.Process(target=_run_module, args=(module, [str(a) for a in argv], str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode, out.read_text(), err.read_text()

    return run


def addp_small_with_visible_norms():
    """A random `addp_vit_small` (eval) whose norms and patch bias are far from their init, so a
    wrong mapping of those weights shows in any comparison of features."""
    import addp
    torch.manual_seed(0)
    net = addp.create_model("addp_vit_small").eval()
    with torch.no_grad():
        for name in ("tokenizer_norm", "norm"):
            getattr(net, name).weight.normal_(1, 0.2)
            getattr(net, name).bias.normal_(0, 0.2)
        net.patch_embed.proj.bias.normal_(0, 0.5)
    return net


@pytest.fixture(scope="module")
def tiny_pipe():
    """An ADDPPipeline of a random `addp_vit_small` and `vqgan_small` (seed 0)."""
    import addp
    torch.manual_seed(0)
    return addp.ADDPPipeline(addp.create_model("addp_vit_small").eval(), addp.create_model("vqgan_small").eval())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random ADDP network with its tokenizer, in our format (shared by the CLI tests)."""
    import addp
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    addp.save_checkpoint(path, {"addp": addp.create_model("addp_vit_small", depth=1, decoder_depth=1),
                                "tokenizer": addp.create_model("vqgan_small")})
    return path
@pytest.fixture(scope="session")
def canvases(tmp_path_factory):
    """The digits canvases of the dense commands at 64 px: 16 training and 4 validation images
    (pass it as `--canvas-dir`)."""
    import json
    from addp.dense.canvas import build_canvases
    root = tmp_path_factory.mktemp("canvas")
    info = build_canvases(root, size=64, train=16, val=4)
    (root / "canvas.json").write_text(json.dumps(info))
    return root


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline file into its modules cache (read once at import,
    from HF_HOME): keep it in tmp_path. Nothing when diffusers is not installed."""
    try:
        import diffusers.utils.dynamic_modules_utils as dyn
    except ImportError:
        return
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face Hub cache in huggingface_hub's documented layout.

    Returns ``add(repo_id, files, revision="main") -> commit``: ``files`` maps a path inside
    the repo to a local file or folder (copied) or bytes. Each file becomes
    ``models--<owner>--<name>/blobs/<sha256>``, linked from ``snapshots/<commit>/<path>``,
    and ``refs/<revision>`` holds the commit. HF_HOME / HF_HUB_CACHE point at the cache and
    offline mode is on, both in the environment (for subprocesses) and in huggingface_hub's
    constants, which it reads once at import.
    """
    import hashlib
    from pathlib import Path

    import huggingface_hub.constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(cache.parent)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, files: dict, revision: str = "main") -> str:
        blobs = {}
        for rel, source in files.items():
            if isinstance(source, (str, Path)) and Path(source).is_dir():
                blobs.update({f"{rel}/{f.relative_to(source).as_posix()}": f.read_bytes()
                              for f in sorted(Path(source).rglob("*")) if f.is_file()})
            else:
                blobs[rel] = source if isinstance(source, bytes) else Path(source).read_bytes()
        commit = hashlib.sha1(b"".join(k.encode() + hashlib.sha256(v).digest() for k, v in sorted(blobs.items())))
        commit = commit.hexdigest()
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        for rel, data in blobs.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs" / revision).write_text(commit)
        return commit

    return add


class PicklePayload:
    """Unpickling this runs a shell command that creates the file `marker`: a loader that
    unpickles arbitrary objects leaves the marker behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
