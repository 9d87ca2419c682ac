"""Triton kernels of addp's fused ops, one op per file (installed as ``addp.kernels``).

Nothing is imported here: each kernel module imports triton itself, and ``addp.ops`` loads
a kernel only when its backend is chosen, so the package works where triton is absent.
"""
