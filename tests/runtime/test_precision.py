"""addp.runtime.precision: names resolved once, contexts that only autocast."""
import subprocess
import sys

import torch

from addp.runtime.precision import autocast, autocast_dtype, precision_context


def test_autocast_of_a_dtype_and_of_none():
    with autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")  # None: plain fp32, whatever the caller had


def test_precision_context_none_keeps_the_callers_context():
    with torch.autocast("cpu", dtype=torch.bfloat16), precision_context(None, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with precision_context(None, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_precision_context_of_a_name_is_its_dtype():
    for name in ("auto", "fp32", "bf16", "fp16"):
        dtype = autocast_dtype(name, torch.device("cpu"))
        with precision_context(name, "cpu"):
            assert torch.is_autocast_enabled("cpu") == (dtype is not None), name
            if dtype is not None:
                assert torch.get_autocast_dtype("cpu") == dtype, name


def test_autocast_leaves_the_process_settings_alone():
    # a fresh process: the malloc settings are applied by tune_for_device only
    code = ("import torch\n"
            "from addp.runtime import precision, tuning\n"
            "with precision.precision_context('bf16', 'cpu'), precision.autocast('cpu', None):\n"
            "    pass\n"
            "info = tuning.keep_freed_memory.cache_info()\n"
            "assert info.hits + info.misses == 0, info\n"
            "tuning.tune_for_device('cpu')\n"
            "assert tuning.keep_freed_memory.cache_info().misses == 1\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
