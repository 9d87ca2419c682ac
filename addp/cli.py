"""What every command-line entry point shares.

`run_command` runs a command: any expected failure (bad option, bad file, OS error, out of
memory) is one `error:` line on stderr and exit code 2; Ctrl-C or SIGTERM is one line and
exit code 130; success prints one JSON line on stdout, `{"command": ..., "status": "ok", ...}`.
Log lines go to stderr. `ArgumentParser` turns argparse's usage errors into the same one line
and runs the checks of option combinations right after parsing, before any work starts.
The argument types below check one value each; `add_runtime_args` declares the run options
(--seed, --device, --precision, --compile) of every command, `add_sampler_args` the sampler
flags of every command that samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from .runtime.distributed import cleanup, env_rank
from .runtime.devices import check_device
from .errors import AddpError, first_line
from .runs.files import check_output_file, check_output_folder
from .runtime.precision import PRECISIONS

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
RESUMABLE = "the last complete checkpoint in {output_dir} is intact; run the same command again to resume"


# --------------------------------------------------------------------------- parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and whose `add_check(fn)` functions run on the parsed
    arguments (they raise AddpError, and may add derived values to the namespace)."""

    def __init__(self, command: str, description: str | None = None, **kwargs):
        module = f"addp.{command}" if command else "addp"
        super().__init__(f"python -m {module}", description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], None]] = []

    def add_check(self, check: Callable[[argparse.Namespace], None]) -> None:
        self.checks.append(check)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        for check in self.checks:
            check(parsed)
        return parsed

    def error(self, message: str):
        raise AddpError(f"{message} (see --help)")


# --------------------------------------------------------------------------- runner
def run_command(command: str, parser: ArgumentParser, main: Callable[[argparse.Namespace], dict],
                argv=None, interrupted: str = "nothing was left half-written") -> int:
    """Parse `argv`, call `main(args)` and print its outputs as the JSON summary line.

    `interrupted` is what the Ctrl-C line says about the outputs; it may name parsed options
    as `{output_dir}`."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    args = None
    try:
        rank = env_rank()
        log_to_stderr(rank)
        args = parser.parse_args(argv)
        outputs = main(args) or {}
    except KeyboardInterrupt:
        note = interrupted.format(**vars(args)) if args is not None else "nothing was done"
        print(f"\ninterrupted: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (torch.OutOfMemoryError, MemoryError) as e:
        return _error(f"out of memory ({first_line(e, None)}){_smaller(args)}")
    except RuntimeError as e:
        if not _is_allocation_failure(e):
            raise
        return _error(f"out of memory ({_allocation_line(e)}); ask for smaller sizes (model options, image "
                      f"sizes{' or --batch-size' if hasattr(args, 'batch_size') else ''})")
    except (AddpError, ValueError) as e:
        return _error(first_line(e, None))
    except OSError as e:
        return _error(_os_error(e))
    finally:
        cleanup()
    if rank == 0:
        print(json.dumps({"command": command, "status": "ok", **outputs}, default=str), flush=True)
    return 0


def _is_allocation_failure(e: RuntimeError) -> bool:
    """PyTorch's CPU allocator reports a failed allocation as a plain RuntimeError."""
    text = str(e)
    return "can't allocate memory" in text or "DefaultCPUAllocator" in text or "not enough memory" in text


def _allocation_line(e: RuntimeError) -> str:
    text = first_line(e, None)
    return text[text.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in text else text


def _smaller(args) -> str:
    """What to try after running out of memory, naming only an option this command has."""
    return "; try a smaller --batch-size" if hasattr(args, "batch_size") else "; ask for smaller sizes"


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def _error(text: str) -> int:
    print(f"error: {text}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _os_error(e: OSError) -> str:
    what = e.strerror or first_line(e, None)
    return f"{what}: {e.filename}" if e.filename else what


class _Stderr(logging.Handler):
    """Writes each record as one line to the sys.stderr of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def log_to_stderr(rank: int = 0) -> None:
    """The package's log lines (INFO and up; warnings only on ranks > 0) go to stderr."""
    logger = logging.getLogger("addp")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


# --------------------------------------------------------------------------- argument types
def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (either bound optional)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_range(low, high, False, False)}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between low and high (bounds optional, open or closed)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {_range(low, high, low_open, high_open)}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def _range(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


positive_int = integer(1)
non_negative_int = integer(0)
random_seed = integer(0, 2 ** 63 - 1)
positive_float = number(0, low_open=True)
non_negative_float = number(0)
probability = number(0, 1)  # a rate or probability in [0, 1]
fraction = number(0, 1, high_open=True)  # [0, 1): dropout, decays that must stay below 1


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists (checkpoints may be folders)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"not found: {text}")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists or can be made, and can be written into."""
    return str(_as_type_error(check_output_folder, text))


def output_file(text: str) -> str:
    """An argparse type: a file path whose folder exists or can be made, and can be written into."""
    return str(_as_type_error(check_output_file, text))


def png_file(text: str) -> str:
    """An argparse type: an output file (as `output_file`) whose name ends in .png, the format written."""
    path = output_file(text)
    if Path(path).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the image is written as PNG: give a .png path, got {text}")
    return path


def _as_type_error(check, text: str):
    try:
        return check(text)
    except AddpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device(text: str) -> str:
    """An argparse type: a torch device that exists here (cpu, cuda, cuda:N, mps)."""
    _as_type_error(check_device, text)
    return text


# --------------------------------------------------------------------------- shared groups
def add_checkpoint_args(parser: ArgumentParser) -> None:
    """--checkpoint and --tokenizer of the commands that load an ADDP network."""
    parser.add_argument("--checkpoint", required=True, type=existing_path,
                        help="our .safetensors (addp + tokenizer), a folder, or addp-vit-*.pth")
    parser.add_argument("--tokenizer", default=None, type=existing_file,
                        help="VQGAN checkpoint when --checkpoint holds no tokenizer")


SEED_HELP = "seed of the command's random draws (initial weights, data order, masks, sampling noise)"
DEVICE_HELP = "where to run: cpu, cuda, cuda:N or mps; none given: cuda when available, else cpu"
PRECISION_HELP = ("autocast of the networks; auto: bf16 on GPUs (fp16 on GPUs without bf16), on CPUs bf16 for "
                  "sampling where it is native (AVX512-BF16/AMX) and fp32 for training; fp32 for "
                  "bitwise-reproducible images across machines")


def add_runtime_args(parser: ArgumentParser, *, seed: bool = True, precision: str | None = "auto",
                     compile: str | None = None, cuda_graph: bool = False) -> None:
    """The run options, declared here once for every command: --seed (when `seed`), --device,
    --precision (default `precision`; None: not taken), --compile (`compile` says what it
    compiles; None: not taken) and --cuda-graph (when `cuda_graph`)."""
    if seed:
        parser.add_argument("--seed", type=random_seed, default=0, help=SEED_HELP)
    parser.add_argument("--device", type=device, default=None, help=DEVICE_HELP)
    if precision is not None:
        parser.add_argument("--precision", default=precision, choices=PRECISIONS, help=PRECISION_HELP)
    if compile is not None:
        parser.add_argument("--compile", action="store_true", help=f"torch.compile {compile}")
    if cuda_graph:
        parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                            help="replay each batch as one captured CUDA graph (default: on for GPUs; same images)")
        parser.add_check(_check_cuda_graph)


def _check_cuda_graph(args) -> None:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and dev.type != "cuda":
        raise AddpError(f"--cuda-graph needs a CUDA device; the model runs on {dev}")


def add_sampler_args(parser: ArgumentParser, prefix: str = "", defaults=None) -> None:
    """The sampler settings, as flags named `--{prefix}NAME`; after parsing,
    `args.sampler_config` holds the `SamplerConfig`: the defaults (or the --protocol's
    settings) with every flag given on the command line applied over them."""
    from .sampling import SAMPLER_PROTOCOLS, SCHEDULES, TEMPERATURE_SCHEDULES, SamplerConfig
    defaults = defaults or SamplerConfig()
    group = parser.add_argument_group("sampler")
    flag = f"--{prefix}"

    def add(name: str, *aliases: str, **kwargs):
        group.add_argument(flag + name, *(flag + a for a in aliases), default=argparse.SUPPRESS, **kwargs)

    add("num-inference-steps", "steps", type=positive_int, dest=f"{prefix}steps".replace("-", "_"),
        help=f"denoising steps T (default: {defaults.steps})")
    add("schedule", choices=SCHEDULES, help=f"mask schedule (default: {defaults.schedule})")
    add("temperature", type=non_negative_float,
        help=f"Gumbel scale of the choice of positions (default: {defaults.temperature:g})")
    add("temperature-schedule", choices=TEMPERATURE_SCHEDULES,
        help=f"annealed: scaled by 1 - (s+1)/T at step s; static: constant (default: {defaults.temperature_schedule})")
    add("top-p", type=number(0, 1, low_open=True),
        help=f"nucleus sampling of candidate ids; 1 samples from the full distribution (default: {defaults.top_p:g})")
    add("parity", action=argparse.BooleanOptionalAction,
        help="the official last step: one position per image stays unreliable and is decoded as a soft token "
             "(its probability-weighted codebook sum); default: every position ends a hard token")
    add("protocol", choices=tuple(SAMPLER_PROTOCOLS),
        help="named settings of the official release; the flags above override them")
    names = {f.name for f in dataclasses.fields(SamplerConfig)}
    dest = prefix.replace("-", "_")

    def resolve(args) -> None:
        given = {n: getattr(args, dest + n) for n in names if hasattr(args, dest + n)}
        protocol = getattr(args, dest + "protocol", None)
        base = SAMPLER_PROTOCOLS[protocol] if protocol else defaults
        args.sampler_config = dataclasses.replace(base, **given)
        args.sampler_protocol = protocol

    parser.add_check(resolve)


def sampler_summary(args) -> dict:
    """The sampler settings of a run, for its JSON summary line."""
    return {"sampler": dataclasses.asdict(args.sampler_config), "protocol": args.sampler_protocol}


def load_pipeline(args):
    """The ADDPPipeline of --checkpoint (and --tokenizer) on --device."""
    from .sampling.pipeline import ADDPPipeline
    return ADDPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
