"""Build of the compiled extension addp._C (metadata lives in pyproject.toml).

Environment:
  ADDP_BUILD_CUDA   auto (default): compile csrc/cuda/*.cu when torch has CUDA, a toolkit is
                    found and a GPU is visible; 1: always; 0: never.
  ADDP_CUDA_ARCHS   CUDA architectures, e.g. "9.0" (default) or "8.0 9.0".
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _cuda_home():
    """Toolkit root (holds lib64/ and include/); nvcc may sit in a wrapper prefix like /usr/local."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for root in (prefix, os.path.join(prefix, "cuda")):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


# Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
_CUDA_HOME = _cuda_home()
if _CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda(cu_sources):
    mode = os.environ.get("ADDP_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false") or not cu_sources:
        return False
    if mode in ("1", "on", "true"):
        return True
    return torch.version.cuda is not None and "CUDA_HOME" in os.environ and torch.cuda.is_available()


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # No -std flag: BuildExtension adds the one the installed torch needs (C++20 for torch 2.14;
    # the sources themselves are C++17). fp-contract lets GCC fuse a*b+c into FMA in -std mode;
    # -Wno-psabi silences notes about vector-type ABIs (the vector helpers are always inlined).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
    kwargs = dict(name="addp._C", extra_link_args=["-fopenmp"])
    if _want_cuda(cu_sources):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("ADDP_CUDA_ARCHS", "9.0")
        return CUDAExtension(
            sources=sources + cu_sources,
            define_macros=[("ADDP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=["addp", *("addp." + p for p in find_packages("addp")), "addp.kernels"],
    package_dir={"addp": "addp", "addp.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
