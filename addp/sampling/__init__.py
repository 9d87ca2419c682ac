"""Generation by alternating denoising: the sampler's config, its schedule, the denoising step,
the acceleration layer (torch.compile, CUDA graphs), the batching driver and `ADDPPipeline`."""
from .accelerate import CudaGraphSampler, clear_cache, compiled_models, graphed_sampler
from .config import (SAMPLER_PROTOCOLS, SCHEDULES, TEMPERATURE_SCHEDULES, GenerationOutput, Generators,
                     SamplerConfig, sampler_config)
from .driver import generate
from .schedule import Schedule, Step, choice_temperatures, mask_schedule
from .step import StepCallback, check_generators, check_models, denoise, denoise_step, eval_mode, sample_batch

__all__ = [
    "SAMPLER_PROTOCOLS", "SCHEDULES", "TEMPERATURE_SCHEDULES", "CudaGraphSampler", "GenerationOutput", "Generators",
    "SamplerConfig", "Schedule", "Step", "StepCallback", "check_generators", "check_models", "choice_temperatures",
    "clear_cache", "compiled_models", "denoise", "denoise_step", "eval_mode", "generate", "graphed_sampler",
    "mask_schedule", "sample_batch", "sampler_config",
]
