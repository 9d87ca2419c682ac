"""Run under torchrun by test_train.py: a few DDP steps, then each rank saves its weights."""
import json
import sys
from pathlib import Path

import torch

import addp
from addp.training.data import DigitsDataset, StepBatchSampler, make_loader
from addp.runtime.distributed import cleanup, init_distributed
from addp.training.stages import ADDPStage
from addp.training.config import TrainConfig
from addp.training.trainer import Trainer

out = Path(sys.argv[1])
dist = init_distributed("cpu")
torch.manual_seed(0)  # the same initial weights on every rank
stage = ADDPStage(addp.create_model("addp_vit_small", depth=1, decoder_depth=1),
                  addp.create_model("vqgan_small"), addp.create_model("mage_vit_small"))
trainer = Trainer(stage, TrainConfig(steps=3, batch_size=8, lr=1e-3, seed=dist.rank), out / "run", dist, {"t": 1})
data = DigitsDataset("train")
keys = StepBatchSampler(len(data), 8, 0, dist.rank, dist.world_size).batch_keys(0)
(out / f"batch{dist.rank}.json").write_text(json.dumps([i for i, _ in keys]))
trainer.fit(lambda start: make_loader(data, 8, 0, dist.rank, dist.world_size, start, 0))
torch.save(trainer.model.state_dict(), out / f"rank{dist.rank}.pt")
cleanup()
