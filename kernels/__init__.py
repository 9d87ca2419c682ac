"""Triton kernels of addp's fused ops, one op per file (installed as ``addp.kernels``).

Nothing is imported here: each kernel module imports triton itself, and ``addp.ops`` imports
a module on the first call of its op on a CUDA tensor (it registers each launcher as the op's
CUDA kernel), so the package works where triton is absent.
"""
