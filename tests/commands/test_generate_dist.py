"""`torchrun -m addp.generate` (gloo, CPU): the images do not depend on the number of processes."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # each test starts torchrun (about 40 s on two shared cores)

N, B = 10, 2  # five batches


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def command(ckpt, out, nproc, n=N):
    args = ["--checkpoint", str(ckpt), "--num-images", str(n), "--batch-size", str(B), "--steps", "3",
            "--seed", "3", "--device", "cpu", "--output-dir", str(out)]
    if nproc == 1:
        return [sys.executable, "-m", "addp.generate", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "addp.generate", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def generate(ckpt, out, nproc, n=N):
    r = subprocess.run(command(ckpt, out, nproc, n), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    generate(ckpt, out, 1)
    return files(out)


def test_two_processes_write_the_files_of_one(ckpt, one_process, tmp_path):
    r = generate(ckpt, tmp_path / "two", 2)
    two = files(tmp_path / "two")
    assert {f"{i:06d}.png" for i in range(N)} | {"samples.npz", "grid.png"} <= set(one_process)
    assert two.keys() == one_process.keys()
    for name in one_process:
        assert two[name] == one_process[name], name
    assert r.stdout.count('"processes": 2') == 1  # rank 0 alone writes the summary


def test_interrupted_two_process_run_resumes_to_the_same_files(ckpt, one_process, tmp_path):
    out = tmp_path / "cut"
    proc = subprocess.Popen(command(ckpt, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not list(out.glob("[0-9]*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun stops its workers and waits for them
    proc.wait(timeout=120)
    made = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert 0 < len(made) < N and not (out / "samples.npz").exists()
    r = generate(ckpt, out, 2)
    assert f'"generated_now": {N - len(made)}' in r.stdout  # nothing on disk was made again
    assert files(out) == one_process


def test_more_processes_than_batches(ckpt, one_process, tmp_path):
    out = tmp_path / "wide"
    generate(ckpt, out, 3, n=4)  # two batches, three processes: rank 2 has nothing to do
    got = files(out)
    assert sorted(n for n in got if n[0].isdigit()) == [f"{i:06d}.png" for i in range(4)]
    for i in range(4):
        assert got[f"{i:06d}.png"] == one_process[f"{i:06d}.png"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
