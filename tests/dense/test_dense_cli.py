"""`addp.detect` / `addp.segment`: one-line errors, short runs, and 2 gloo processes agreeing
with one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run(module, argv, nproc=1):
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else []) + ["-m", module]
    out = subprocess.run(launch + [str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out.returncode, out.stdout, out.stderr


def summary(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["addp.detect", "addp.segment"])
def test_bad_data_is_one_line(module, tmp_path):
    code, _, err = run(module, ["--data-path", tmp_path, "--output-dir", tmp_path / "o"])
    assert code == 2 and err.strip().startswith("error: no ") and len(err.strip().splitlines()) == 1, err


def test_segment_two_processes_match_one(canvases, tmp_path):
    common = ["--canvas-dir", canvases, "--input-size", 64, "--steps", 2, "--log-every", 1, "--global-batch", 4,
              "--jitter", 1, 1]
    code, out1, err = run("addp.segment", common + ["--output-dir", tmp_path / "one"])
    assert code == 0, err[-2000:]
    code, out2, err = run("addp.segment", common + ["--output-dir", tmp_path / "two"], nproc=2)
    assert code == 0, err[-2000:]
    one, two = summary(out1), summary(out2)
    assert one["val_images"] == 4 and (tmp_path / "one" / "segmenter.safetensors").exists()
    # the UperNet decoder's BatchNorm sees each process's half batch: close, not equal
    assert two["mIoU"] == pytest.approx(one["mIoU"], abs=1.0)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


def test_detect_runs_and_two_processes_evaluate_as_one(canvases, tmp_path):
    common = ["--canvas-dir", canvases, "--input-size", 64]
    code, out, err = run("addp.detect", common + ["--steps", 2, "--batch-size", 2, "--output-dir", tmp_path / "t"])
    assert code == 0, err[-2000:]
    trained = summary(out)
    assert {"bbox_AP", "segm_AP", "bbox_AP50"} <= set(trained) and (tmp_path / "t" / "predictions.png").exists()
    ckpt = tmp_path / "t" / "detector.safetensors"
    runs = [summary(run("addp.detect", common + ["--eval-only", "--finetune", ckpt, "--output-dir", tmp_path / f"e{n}"],
                        nproc=n)[1]) for n in (1, 2)]
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
        assert runs[1][key] == pytest.approx(runs[0][key], abs=1e-6), key
    # an evaluation writes eval.json, never a run's report.json
    assert (tmp_path / "e1" / "eval.json").exists() and not (tmp_path / "e1" / "report.json").exists()
