"""torchrun, srun (SLURM) or single-process set-up: NCCL on GPUs, gloo on CPUs; rank 0 writes."""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import AddpError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# SLURM runs without MASTER_PORT take a port from the job id, in [20000, 40000): above the
# well-known ports, and different for jobs whose ids differ by less than the span
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000

def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise AddpError(f"{name}={env[name]!r} in the environment is not an integer") from None


def env_rank(env=None) -> int:
    """This process's RANK from the environment (0 when unset): which process prints and logs."""
    env = os.environ if env is None else env
    return _int_env(env, "RANK") if "RANK" in env else 0


def _split_outside_brackets(text: str, whole: str) -> list[str]:
    """Split at the commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise AddpError(f"unbalanced brackets in the SLURM node list {whole!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise AddpError(f"unbalanced brackets in the SLURM node list {whole!r}")
    return parts + [text[start:]]


def _bracket_values(ranges: str, whole: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]; a range keeps its lower bound's width (zero padding)."""
    values = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise AddpError(f"cannot read the range {item!r} in the SLURM node list {whole!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise AddpError(f"the range {item!r} in the SLURM node list {whole!r} runs backwards")
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list, in SLURM's order: brackets anywhere in a name, several
    bracket groups expand as a cartesian product (the leftmost varies slowest), ranges keep
    their zero padding, commas separate names and ranges: "gpu[01-02],a[1-2]b[3]" ->
    ["gpu01", "gpu02", "a1b3", "a2b3"]."""
    hosts = []
    for name in _split_outside_brackets(nodelist.strip(), nodelist):
        name = name.strip()
        if not name:
            raise AddpError(f"empty host name in the SLURM node list {nodelist!r}")
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
        choices = [[p] if i % 2 == 0 else _bracket_values(p, nodelist) for i, p in enumerate(pieces)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, from `scontrol show hostnames` where it exists, else
    from `expand_nodelist`: "rack[1-2]-node[03-04]" -> "rack1-node03"."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def launch_env(env=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, from torchrun's environment (RANK,
    WORLD_SIZE, LOCAL_RANK) or, without it, SLURM's (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID; rendezvous at MASTER_ADDR or the first node, MASTER_PORT or a port drawn
    from the job id), which it exports for torch.distributed. A contradictory environment
    is an AddpError."""
    env = os.environ if env is None else env
    slurm = "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)
    if "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        rank = _int_env(env, "RANK") if "RANK" in env else 0
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if slurm:  # torchrun inside srun: one torchrun agent per SLURM task
            tasks = _int_env(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
            if world < tasks or world % tasks:
                raise AddpError(f"torchrun's WORLD_SIZE={world} and SLURM's {tasks} tasks disagree "
                                "(launch with srun alone, or one torchrun per SLURM task)")
        source = "WORLD_SIZE"
    elif slurm:
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world, rank = _int_env(env, tasks_var), _int_env(env, "SLURM_PROCID")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        source = tasks_var
        if world > 1:
            if "MASTER_ADDR" not in env:
                nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
                if not nodes:
                    raise AddpError("SLURM gives no node list (SLURM_NODELIST) and MASTER_ADDR is not set")
                env["MASTER_ADDR"] = first_host(nodes)
            job = int(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID", "").isdigit() else 0
            env.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + job % SLURM_PORT_SPAN))
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    else:
        return 0, 1, 0
    if world < 1 or not 0 <= rank < world or local < 0:
        raise AddpError(f"rank {rank} does not fit a world of {world} processes ({source}); "
                        "the launch environment is contradictory")
    return rank, world, local


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group of a torchrun or srun launch (see `launch_env`); a single
    process otherwise. NCCL on GPUs, gloo on CPUs."""
    rank, world, local = launch_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (no guessed device in barrier)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
