"""How `addp.train` runs its stages in a run folder: the data and schedule, each stage's identity
(what its output is made from), reusing a cached output only when it matches, training the
stage otherwise, and writing the output with its record."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..models import registry
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.distributed import barrier
from ..errors import AddpError
from ..runs.records import check_inputs, compare_output, sha256_file, write_pending_record, write_record
from .stages import PredictorStage, TokenizerStage
from .config import step_schedule, train_config_from_args, TrainConfig, identity_of
from .trainer import Trainer
STAGES = ("tokenizer", "predictor", "addp")
# Defaults when neither a recipe nor a flag sets them: the official pretraining's (base lr 1e-4,
# 40 warm-up epochs) for the paper's models; the small demo models on 1,438 digits train
# with a larger base lr and a short warm-up.
OFFICIAL_BLR, OFFICIAL_WARMUP_EPOCHS = 1e-4, 40
DEMO_BLR, DEMO_WARMUP_STEPS = 4e-3, 100
# held-out images drawn (seed 0) from a --data-path's val/ for the report's numbers
HELDOUT_FOLDER_IMAGES = 512
log = logging.getLogger("addp.train")


def build_dataset(args, image_size: int):
    from .data import DigitsDataset, ImageFolderDataset, training_folder
    if args.data_path:
        folder, line = training_folder(args.data_path)
        if line:
            log.info(line)
        return ImageFolderDataset(folder, image_size, args.crop_min, not args.no_flip, seed=args.seed)
    return DigitsDataset("train", image_size, flip=False, seed=args.seed)



def schedule(args, num_samples: int, world_size: int) -> dict:
    """ADDP steps and warm-up steps, from epochs where they are given in epochs."""
    def default_warmup(convert, steps):
        if args.model.endswith("_small"):
            return DEMO_WARMUP_STEPS, None
        return convert(OFFICIAL_WARMUP_EPOCHS, 0), OFFICIAL_WARMUP_EPOCHS

    return step_schedule(args, num_samples, world_size, default_warmup)



def train_config(args, stage: str, sched: dict) -> TrainConfig:
    steps = {"tokenizer": args.tokenizer_steps, "predictor": args.predictor_steps, "addp": sched["steps"]}[stage]
    lr = {"tokenizer": args.tokenizer_lr, "predictor": args.predictor_lr, "addp": args.lr}[stage]
    blr = args.blr if args.blr is not None else (DEMO_BLR if args.model.endswith("_small") else OFFICIAL_BLR)
    return train_config_from_args(args, steps=steps, lr=lr, blr=blr, warmup_steps=min(sched["warmup_steps"], steps - 1),
                                  weight_decay=0.0 if stage == "tokenizer" else args.weight_decay)



def stage_identity(args, name: str, model_config, inputs: dict, dist) -> dict:
    """What a stage's output is made from: its training and model config, the data, and the
    SHA-256 of each file it consumes (`inputs`)."""
    run = {"recipe": args.recipe_record} if args.recipe_record else {}
    if name == "addp":
        run["schedule"] = args.schedule
    return identity_of(train_config(args, name, args.schedule), model_config, inputs, run,
                       {"data": args.data_path or "digits", "world_size": dist.world_size})



def run_stage(stage, args, dist, dataset, identity: dict) -> dict:
    """Train one stage in output/<stage>/ (resuming if a matching checkpoint is there)."""
    from .data import make_loader
    cfg = train_config(args, stage.name, args.schedule)
    out = Path(args.output_dir) / stage.name
    trainer = Trainer(stage, cfg, out, dist, identity)
    trainer.maybe_resume(args.resume if args.stage == stage.name else None, args.force)
    if trainer.step:
        log.info(f"[{stage.name}] resuming at step {trainer.step} from {trainer.checkpoint_path}")
    result = trainer.fit(lambda start: make_loader(dataset, cfg.batch_size, cfg.seed, dist.rank,
                                                   dist.world_size, start, cfg.num_workers))
    result["model"] = trainer.final_model()
    return result



def refuse_or_retrain(args, name: str, file: Path, identity: dict, dist) -> str | None:
    """The SHA-256 of the cached output `file` of stage `name` when it was made exactly as this
    command would make it; None when the stage must be trained (no file, or --force over a
    file made from something else). A mismatch without --force is an error."""
    sha, problem = compare_output(Path(args.output_dir), name, file, identity)
    if problem and not args.force:
        raise AddpError(f"stage {name}: {file} {problem}; pass --force to retrain it, or pick another --output-dir")
    if problem:
        log.info(f"[{name}] {file} {problem}; --force: retraining it")
    if sha and args.resume and args.stage == name and name != "addp":  # the ADDP stage always runs
        raise AddpError(f"--resume: stage {name} is finished in {args.output_dir} ({file} matches this command), "
                        "so nothing would be resumed; drop --resume, or pick another --output-dir")
    return sha



def use_cached_input(args, name: str, file: Path, inputs: dict) -> None:
    """Refuse a cached stage output of the run folder that was made against other inputs."""
    problem = check_inputs(Path(args.output_dir), name, file, inputs)
    if problem:
        raise AddpError(f"stage {name}: {file} {problem}; retrain it with --stage {name} --force "
                        f"(or --stage all --force), or pass the file you mean as --{name}")



def tokenizer_for(args, dist, dataset, net_config, preset: str, runs):
    """The tokenizer this command uses and the SHA-256 of its file: --tokenizer, else the run
    folder's (reused when it matches this command, trained when the stage runs)."""
    if args.tokenizer:
        return load_checkpoint(args.tokenizer, component="tokenizer"), sha256_file(args.tokenizer)
    file = Path(args.output_dir) / "tokenizer.safetensors"
    if "tokenizer" not in runs:
        if not file.exists():
            raise AddpError(f"no tokenizer: pass --tokenizer, or run --stage tokenizer first (looked for {file})")
        use_cached_input(args, "tokenizer", file, {})
        log.info(f"[tokenizer] cached: {file}")
        return load_checkpoint(file), sha256_file(file)
    config = registry.preset_config(args.tokenizer_model or preset, image_size=net_config.image_size)
    identity = stage_identity(args, "tokenizer", config, {}, dist)
    sha = refuse_or_retrain(args, "tokenizer", file, identity, dist)
    if sha:
        log.info(f"[tokenizer] cached: {file}")
        return load_checkpoint(file), sha
    model = run_stage(TokenizerStage(registry.build_model(config)), args, dist, dataset, identity)["model"]
    return model, save_stage_output(dist, file, model, "tokenizer", identity)



def predictor_for(args, dist, dataset, tokenizer, tok_sha: str, diffusion, preset: str, runs, given=None):
    """The token predictor and the SHA-256 of its file, as `tokenizer_for` (`given`: the loaded
    --predictor); a cached one must have been trained against this tokenizer (`tok_sha`)."""
    if given is not None:
        return given, sha256_file(args.predictor)
    file = Path(args.output_dir) / "predictor.safetensors"
    inputs = {"tokenizer_sha256": tok_sha}
    if "predictor" not in runs:
        if not file.exists():
            raise AddpError(f"no token predictor: pass --predictor, or run --stage predictor first (looked for {file})")
        use_cached_input(args, "predictor", file, inputs)
        log.info(f"[predictor] cached: {file}")
        return load_checkpoint(file), sha256_file(file)
    config = registry.preset_config(args.predictor_model or preset, codebook_size=tokenizer.config.codebook_size)
    identity = stage_identity(args, "predictor", config, inputs, dist)
    sha = refuse_or_retrain(args, "predictor", file, identity, dist)
    if sha:
        log.info(f"[predictor] cached: {file}")
        return load_checkpoint(file), sha
    stage = PredictorStage(registry.build_model(config), tokenizer, diffusion)
    model = run_stage(stage, args, dist, dataset, identity)["model"]
    return model, save_stage_output(dist, file, model, "predictor", identity)



def heldout_images(args, net_config) -> torch.Tensor:
    from .data import ImageFolderDataset, load_digits
    if not args.data_path:
        return load_digits("heldout", net_config.image_size)[0]
    root = Path(args.data_path)
    val = ImageFolderDataset(root / "val" if (root / "val").is_dir() else root, net_config.image_size, train=False)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:HELDOUT_FOLDER_IMAGES]
    return torch.stack([val[int(i)][0] for i in pick])



def save_stage_output(dist, path: Path, models, stage: str, identity: dict) -> str:
    """Write a stage output and its record (rank 0); every rank returns the file's SHA-256."""
    if dist.is_main:
        write_pending_record(path.parent, stage, path, identity)
        save_checkpoint(path, models)
        write_record(path.parent, stage, path, identity)
    barrier()
    return sha256_file(path)
