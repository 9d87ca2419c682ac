"""How a process runs: numeric precision, device speed settings, torch.compile of frozen
passes, and the distributed (torchrun / SLURM) set-up."""
