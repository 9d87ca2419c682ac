"""`python -m addp`: a short smoke run of the three small models on real digits.

The training CLI (`python -m addp.train`) replaces this as the main job.
"""
import time

import torch

import addp
from addp import ops
from addp.data import load_digits


def main() -> None:
    torch.manual_seed(0)
    images, labels = load_digits("heldout")
    x = images[:16]
    print(f"digits: {len(images)} held-out images {tuple(images.shape[1:])}, labels {labels[:16].tolist()}")
    tok, pred, net = (addp.create_model(n).eval() for n in ("vqgan_small", "mage_vit_small", "addp_vit_small"))
    with torch.no_grad():
        t = time.perf_counter()
        ids = tok.encode(x)
        mask = torch.rand(ids.shape).argsort(1).argsort(1) < ids.shape[1] // 2
        logits_q = pred(ids, mask)
        x_t = tok.decode_embeddings(ops.codebook_weighted_sum(logits_q, tok.codebook, ids, mask))
        logits = net(x_t, ids, mask, num_reliable=ids.shape[1] - ids.shape[1] // 2)
        dt = time.perf_counter() - t
    print(f"tokenizer: ids {tuple(ids.shape)}; predictor logits {tuple(logits_q.shape)}; "
          f"x_t {tuple(x_t.shape)}; ADDP logits {tuple(logits.shape)} in {dt * 1e3:.0f} ms")
    ref = ops.codebook_weighted_sum_reference(logits_q, tok.codebook, ids, mask)
    fused = ops.codebook_weighted_sum(logits_q, tok.codebook, ids, mask)
    print(f"weighted sum: compiled op available={ops.has_compiled_ops()}, "
          f"max |fused - reference| = {(fused - ref).abs().max().item():.2e}")
    print("models:", ", ".join(addp.list_models()))


if __name__ == "__main__":
    main()
