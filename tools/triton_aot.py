"""Ahead-of-time compilation of every Triton kernel of ``addp.kernels`` for NVIDIA GPUs, on a
machine without one.

The launchers run on CPU tensors at the shapes users meet. Each kernel launch is caught
before it reaches a device, specialised exactly as Triton's runtime would specialise it on a
GPU (argument types, pointer alignment, integers equal to 1), and compiled for the target
with the real compiler; ptxas then reports registers and spills. This finds what the
interpreter (TRITON_INTERPRET=1) cannot: layout and ``tl.dot`` shape rules, dtype
combinations, shared-memory and register limits.

    python tools/triton_aot.py --out benchmarks/results/triton_aot_resources.md

writes the per-kernel resource table (the test ``tests/ops/test_kernels_aot.py`` compiles the
same matrix and fails on any compile error or limit overrun).
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import addp.kernels.gumbel_topk as gumbel_topk_kernels
import addp.kernels.soft_ce as soft_ce_kernels
import addp.kernels.weighted_sum as weighted_sum_kernels

KERNEL_MODULES = (weighted_sum_kernels, gumbel_topk_kernels, soft_ce_kernels)

# name -> (compute capability, max shared memory per block in bytes (opt-in), registers per block)
TARGETS = {
    "sm_90": (90, 232448, 65536),  # H100 / H200: 227 KiB
    "sm_80": (80, 166912, 65536),  # A100: 163 KiB
}
MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class Shapes:
    """Sizes of one model layout: batch B, tokens L, codebook K x D, vocabulary V."""
    B: int
    L: int
    K: int
    D: int
    V: int


# ViT-B/16 and ViT-L/16 at 256 px share the token layout (MAGE's VQGAN, vocab 1024 + 1000 + 1);
# "cpu-small" is the demo presets (vqgan_small, addp_vit_small); "tiny" takes the
# launchers' small-row branches.
SHAPES = {
    "vit-256": Shapes(B=64, L=256, K=1024, D=256, V=2025),
    "cpu-small": Shapes(B=32, L=64, K=256, D=32, V=258),
    "tiny": Shapes(B=1, L=16, K=40, D=24, V=83),
}
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as the launcher made it (positional args and keyword meta-args)."""
    kernel: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    kernel: str
    case: str
    target: str
    constexprs: str
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    problems: list[str]


def _jit_functions():
    for module in KERNEL_MODULES:
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                yield value


def capture_launches(call: Callable[[], object]) -> list[Launch]:
    """Run ``call`` (a launcher on CPU tensors) with every kernel's launch replaced by a record."""
    launches: list[Launch] = []
    kernels = list(_jit_functions())
    for k in kernels:
        k.run = lambda *args, grid, warmup, _k=k, **kwargs: launches.append(Launch(_k, args, kwargs))
    try:
        call()
    finally:
        for k in kernels:
            del k.run  # back to JITFunction.run
    return launches


def specialise(launch: Launch, target: str):
    """(GPU target, signature, constexprs, attrs, options) of a launch, as Triton's runtime
    specialises it for a GPU of ``target`` ("sm_90" / "sm_80")."""
    gpu = GPUTarget("cuda", TARGETS[target][0], 32)
    backend = make_backend(gpu)
    fn = launch.kernel
    kwargs = {"debug": False, **launch.kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return gpu, signature, constexprs, attrs, options


def compile_launch(launch: Launch, target: str):
    """Compile one recorded launch for ``target``: (compiled kernel, its constexprs)."""
    gpu, signature, constexprs, attrs, options = specialise(launch, target)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=gpu, options=options.__dict__), constexprs


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) that ptxas reports for the PTX."""
    arch = next(line.split()[1] for line in ptx.splitlines() if line.startswith(".target"))  # e.g. sm_90a
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([_ptxas(), "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def limit_problems(target: str, registers: int, shared: int, num_warps: int) -> list[str]:
    """What stops a kernel from launching on ``target`` (register spills only slow it down:
    they are reported apart)."""
    _, max_shared, regs_per_block = TARGETS[target]
    problems = []
    if shared > max_shared:
        problems.append(f"shared memory {shared} B > {max_shared} B")
    if registers > MAX_REGISTERS_PER_THREAD or registers * num_warps * 32 > regs_per_block:
        problems.append(f"{registers} registers x {num_warps * 32} threads > {regs_per_block}")
    return problems


def _compile_report(launch: Launch, case: str, target: str) -> Compiled:
    names = launch.kernel.arg_names
    try:
        kernel, constexprs = compile_launch(launch, target)
    except Exception as e:  # the compiler's own message is the result
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return Compiled(launch.kernel.__name__, case, target, "", 0, 0, 0, 0, [f"compile error: {first}"])
    registers, spills = ptxas_usage(kernel.asm["ptx"])
    shown = ", ".join(f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items())
                      if names[path[0]].isupper())
    num_warps, shared = kernel.metadata.num_warps, kernel.metadata.shared
    return Compiled(launch.kernel.__name__, case, target, shown, num_warps, registers, spills, shared,
                    limit_problems(target, registers, shared, num_warps))


@dataclass(frozen=True)
class TensorSpec:
    """What a launch's specialisation reads of a tensor argument: its dtype and 16-byte alignment."""
    dtype: torch.dtype
    aligned: bool

    def stand_in(self) -> torch.Tensor:
        base = torch.empty(64, dtype=self.dtype)
        return base if self.aligned else base[1:]


def _spec(arg):
    return TensorSpec(arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor) else arg


def _stand_in(arg):
    return arg.stand_in() if isinstance(arg, TensorSpec) else arg


def _compile_job(job) -> Compiled:
    module, name, specs, kwargs, case, target = job
    kernel = getattr(importlib.import_module(module), name)
    return _compile_report(Launch(kernel, tuple(_stand_in(a) for a in specs), kwargs), case, target)


# --------------------------------------------------------------------------- the launch matrix
def _weighted_sum_cases():
    for shape_name, s in SHAPES.items():
        for lname, ldt in FLOATS.items():
            for cname, cdt in FLOATS.items():
                for masked in (False, True):
                    def call(s=s, ldt=ldt, cdt=cdt, masked=masked):
                        logits = torch.randn(s.B, s.L, s.V, dtype=ldt)[..., :s.K]
                        codebook = torch.randn(s.K, s.D, dtype=cdt)
                        ids = torch.randint(0, s.K, (s.B, s.L)) if masked else None
                        mask = torch.rand(s.B, s.L) < 0.5 if masked else None
                        weighted_sum_kernels.codebook_weighted_sum(logits, codebook, ids, mask, 1.0)
                    yield f"{shape_name} logits={lname} codebook={cname} mask={masked}", call


def _unmask_cases():
    for shape_name, s in SHAPES.items():
        for lname, ldt in FLOATS.items():
            for nucleus in (False, True):
                def call(s=s, ldt=ldt, nucleus=nucleus):
                    logits = torch.randn(s.B, s.L, s.V, dtype=ldt)[..., :s.K]
                    u1 = torch.rand(s.B, s.L, s.K)
                    u2 = torch.rand(s.B, s.L, dtype=torch.float64)
                    ids = torch.randint(0, s.K, (s.B, s.L))
                    mask = torch.rand(s.B, s.L) < 0.5
                    keep = torch.rand(s.B, s.L, s.K) < 0.9 if nucleus else None
                    mask_len = torch.tensor(s.L // 2)
                    gumbel_topk_kernels.gumbel_topk_unmask(logits, u1, u2, ids, mask, mask_len, 2.0, keep)
                yield f"{shape_name} logits={lname} top_p={'<1' if nucleus else '1'}", call


def _soft_ce_cases():
    for shape_name, s in SHAPES.items():
        for lname, ldt in FLOATS.items():
            for tname in sorted({"fp32", lname}):
                def call(s=s, ldt=ldt, tdt=FLOATS[tname]):
                    logits = torch.randn(s.B, s.L, s.V, dtype=ldt)
                    target = torch.softmax(torch.randn(s.B, s.L, s.K), -1).to(tdt)
                    mask = torch.rand(s.B, s.L) < 0.5
                    # forward launches are recorded; its outputs are never computed, so
                    # the backward gets stand-ins of the right shapes and dtypes
                    soft_ce_kernels.soft_target_cross_entropy(logits, target, mask, 0.1)
                    stats = torch.zeros(s.B, s.L)
                    soft_ce_kernels.soft_target_cross_entropy_backward(
                        torch.ones(()), logits, target, mask, stats, stats, 0.1)
                yield f"{shape_name} logits={lname} target={tname}", call


def launch_matrix() -> list[tuple[str, Launch]]:
    """(case, launch) for every launch the launchers make over shapes, dtypes and options."""
    out = []
    for cases in (_weighted_sum_cases(), _unmask_cases(), _soft_ce_cases()):
        for case, call in cases:
            out.extend((case, launch) for launch in capture_launches(call))
    return out


def compile_all(targets=tuple(TARGETS), workers: int | None = None) -> list[Compiled]:
    """Compile every launch of the matrix for every target, each distinct specialisation once,
    in ``workers`` processes (default: one per CPU core)."""
    jobs = {}
    for case, launch in launch_matrix():
        specs = tuple(_spec(a) for a in launch.args)  # plain values: cheap to send to a worker
        small = Launch(launch.kernel, tuple(_stand_in(a) for a in specs), launch.kwargs)
        for target in targets:
            key = (launch.kernel.__name__, target, _specialisation_key(small, target))
            if key not in jobs:
                jobs[key] = (launch.kernel.__module__, launch.kernel.__name__, specs, launch.kwargs, case, target)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
        return list(pool.map(_compile_job, jobs.values()))


def _specialisation_key(launch: Launch, target: str) -> str:
    _, signature, constexprs, attrs, options = specialise(launch, target)
    return repr((sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


def markdown_table(results: list[Compiled]) -> str:
    lines = [
        "| kernel | target | first case compiled | constexprs | warps | registers | spills (B) | shared (B) | within limits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.target, r.case)):
        ok = "yes" if not r.problems else "; ".join(r.problems)
        lines.append(f"| {r.kernel} | {r.target} | {r.case} | {r.constexprs} | {r.num_warps} | "
                     f"{r.registers} | {r.spill_bytes} | {r.shared_bytes} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown table here (default: print it)")
    args = parser.parse_args(argv)
    results = compile_all()
    header = (f"# Triton kernels compiled ahead of time (Triton {triton.__version__}, torch {torch.__version__})\n\n"
              f"Written by `python tools/triton_aot.py --out {args.out or '<file>'}`: every launch the launchers "
              f"of `kernels/` make at the shapes {', '.join(f'{k} {v}' for k, v in SHAPES.items())}, "
              f"for float32/bfloat16/float16 inputs, compiled for {', '.join(TARGETS)}; registers and spills "
              f"from ptxas, shared memory from the compiled metadata. One row per distinct specialisation.\n\n")
    text = header + markdown_table(results) + "\n"
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    bad = [r for r in results if r.problems]
    spilling = sum(1 for r in results if r.spill_bytes)
    print(f"{len(results)} compiled kernels, {len(bad)} beyond a limit, {spilling} with register spills",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
