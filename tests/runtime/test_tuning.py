"""addp.runtime.tuning: the CPU malloc settings keep freed tensor memory in the process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from addp.runtime import tuning

# Allocates and frees four tensors of 24 MiB and more, 20 times, each round's a little larger
# than the last. Under glibc's defaults every one is above the mmap threshold (which rises to the
# largest block freed so far), so each round maps fresh memory and faults in every page.
CHURN = """
import json, resource
import torch
from addp.runtime.tuning import keep_freed_memory
applied = keep_freed_memory()
def churn(r):
    tensors = [torch.ones((24 << 18) + r * (16 << 10)) for _ in range(4)]  # 24 MiB + r * 64 KiB each
    del tensors
churn(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for r in range(1, 21):
    churn(r)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES_PER_ROUND = 4 * (24 << 20) // 4096


def _churn(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("ADDP_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", CHURN], env={**environ, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(tuning._glibc() is None, reason="mallopt settings apply to glibc only")


@glibc
def test_freed_tensor_memory_is_reused_without_page_faults():
    tuned, system = _churn(), _churn(ADDP_MALLOC="system")
    assert tuned["applied"] and not system["applied"]
    # the control shows the churn does fault under glibc's defaults (else this test proves nothing)
    assert system["faults"] > 15 * PAGES_PER_ROUND, system
    assert tuned["faults"] < PAGES_PER_ROUND, tuned


@pytest.mark.parametrize("env,reason", [
    ({"ADDP_MALLOC": "system"}, "ADDP_MALLOC=system"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "another allocator is preloaded"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES sets malloc's tunables"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, None),
    ({}, None),
])
def test_malloc_choice_respects_the_users_allocator(monkeypatch, env, reason):
    for name in ("ADDP_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tuning.malloc_choice() == reason


def test_tune_for_device_switches_on_cudnn_autotuning_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tuning.tune_for_device("cpu")
    assert torch.backends.cudnn.benchmark is False
    tuning.tune_for_device(torch.device("cuda", 0))  # sets a flag; needs no GPU
    assert torch.backends.cudnn.benchmark is True
