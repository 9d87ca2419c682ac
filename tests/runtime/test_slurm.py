"""Launching with srun: SLURM's environment forms the process group when torchrun's is absent."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from addp.runtime.distributed import expand_nodelist, first_host, launch_env
from addp.models.registry import AddpError

HERE = Path(__file__).parents[1]  # tests/, where dist_worker.py is
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_srun_tasks_form_one_process_group(tmp_path):
    """Two processes given only SLURM's variables (as srun -n2 sets them) train in one DDP
    group: different batches per rank, identical replicas after the steps."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_worker.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "batch0.json").read_text() != (tmp_path / "batch1.json").read_text()


def test_slurm_variables_are_read_and_exported():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[03-04]",
           "SLURM_JOB_ID": "4242"}
    assert launch_env(env) == (5, 8, 1)
    assert env["MASTER_ADDR"] == "gpu03" and env["MASTER_PORT"] == str(20000 + 4242)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    given = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    launch_env(given)
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("head", "1234")
    assert launch_env({}) == (0, 1, 0)
    # torchrun inside srun (one agent per task, 4 processes each)
    assert launch_env({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "SLURM_PROCID": "1",
                       "SLURM_NTASKS": "2"}) == (6, 8, 2)
    assert first_host("node7,node8") == "node7" and first_host("a-b[010-012]") == "a-b010"


@pytest.mark.parametrize("env, words", [
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"}, "rank 3 does not fit a world of 2"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 does not fit a world of 2"),
    ({"WORLD_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "WORLD_SIZE=1 and SLURM's 4 tasks disagree"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x'"),
])
def test_contradictory_environment_is_an_error(env, words):
    with pytest.raises(AddpError, match=words):
        launch_env(dict(env))


def test_contradictory_environment_is_one_line_from_the_command(tmp_path):
    env = clean_env(SLURM_PROCID="3", SLURM_NTASKS="2", SLURM_NODELIST="localhost")
    proc = subprocess.run([sys.executable, "-m", "addp.train", "--output-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.startswith("error: rank 3 does not fit a world of 2") and "\n" not in err
    assert not (tmp_path / "tokenizer").exists()


# What `scontrol show hostnames` prints for each form (SLURM's hostlist syntax).
NODELISTS = [
    ("node7", ["node7"]),
    ("node7,node8", ["node7", "node8"]),
    ("gpu[03-05,9],cpu1", ["gpu03", "gpu04", "gpu05", "gpu9", "cpu1"]),
    ("a-b[010-012]", ["a-b010", "a-b011", "a-b012"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("rack[1-2]-node[3-4]", ["rack1-node3", "rack1-node4", "rack2-node3", "rack2-node4"]),
    ("[1-2]x", ["1x", "2x"]),
    ("r[1,3]n[01-02].cluster,login", ["r1n01.cluster", "r1n02.cluster", "r3n01.cluster", "r3n02.cluster", "login"]),
    ("c[5]", ["c5"]),
    (" h[1-2] , h[4] ", ["h1", "h2", "h4"]),
    ("x[1-2]y[7]z[0-1]", ["x1y7z0", "x1y7z1", "x2y7z0", "x2y7z1"]),
]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_node_lists_expand_as_slurm_does(nodelist, hosts, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: our own expansion
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist, words", [
    ("a[1-2", "unbalanced brackets"), ("a]1[", "unbalanced brackets"), ("a[[1]]", "unbalanced brackets"),
    ("a[x-2]", "cannot read the range 'x-2'"), ("a[5-3]", "runs backwards"), ("a,,b", "empty host name"),
])
def test_bad_node_lists_are_one_line_errors(nodelist, words):
    with pytest.raises(AddpError, match=words):
        expand_nodelist(nodelist)


def test_scontrol_is_asked_where_it_exists(tmp_path, monkeypatch):
    """With `scontrol` on PATH, its `show hostnames` answer is the first host."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "from-scontrol\\nother\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert first_host("n[1-2]") == "from-scontrol"
