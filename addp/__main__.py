"""`python -m addp`: a short smoke run of the three small models on real digits.

The training CLI (`python -m addp.train`) is the main job.
"""
import logging
import sys
import time

import torch

import addp
from addp import ops
from addp.cli import ArgumentParser, run_command
from addp.training.data import load_digits

log = logging.getLogger("addp.smoke")


def get_args_parser() -> ArgumentParser:
    return ArgumentParser("", description=__doc__.split("\n\n")[0])


def main(args) -> dict:
    torch.manual_seed(0)
    images, labels = load_digits("heldout")
    x = images[:16]
    log.info(f"digits: {len(images)} held-out images {tuple(images.shape[1:])}, labels {labels[:16].tolist()}")
    tok, pred, net = (addp.create_model(n).eval() for n in ("vqgan_small", "mage_vit_small", "addp_vit_small"))
    with torch.no_grad():
        t = time.perf_counter()
        ids = tok.encode(x)
        mask = torch.rand(ids.shape).argsort(1).argsort(1) < ids.shape[1] // 2
        logits_q = pred(ids, mask)
        x_t = tok.decode_embeddings(ops.codebook_weighted_sum(logits_q, tok.codebook, ids, mask))
        logits = net(x_t, ids, mask, num_reliable=ids.shape[1] - ids.shape[1] // 2)
        dt = time.perf_counter() - t
    log.info(f"tokenizer: ids {tuple(ids.shape)}; predictor logits {tuple(logits_q.shape)}; "
             f"x_t {tuple(x_t.shape)}; ADDP logits {tuple(logits.shape)} in {dt * 1e3:.0f} ms")
    ref = ops.codebook_weighted_sum_reference(logits_q, tok.codebook, ids, mask)
    fused = ops.codebook_weighted_sum(logits_q, tok.codebook, ids, mask)
    diff = (fused - ref).abs().max().item()
    log.info(f"weighted sum: compiled op available={ops.has_compiled_ops()}, max |fused - reference| = {diff:.2e}")
    return {"ids_shape": list(ids.shape), "addp_logits_shape": list(logits.shape), "forward_ms": round(dt * 1e3, 1),
            "compiled_ops": ops.has_compiled_ops(), "weighted_sum_max_abs_diff": diff, "models": addp.list_models()}


if __name__ == "__main__":
    sys.exit(run_command("smoke", get_args_parser(), main))
