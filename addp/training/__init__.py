"""Pretraining and fine-tuning: data, the diffusion process that builds (x_t, target), the losses,
the objectives of each stage, the shared training loop and the named recipes."""
