"""Writing files: symlinks are never followed, modes follow the umask, only our temp files are cleaned."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from addp.errors import AddpError
from addp.evaluation.reference_stats import ReferenceStats, load_stats, save_stats
from addp.runs.files import atomic_write, open_append, probe_writable, remove_stale_temp_files, write_json


def test_a_symlink_at_the_output_is_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    write_json(out / "report.json", {"b": 1, "a": 2})
    assert victim.read_text() == "precious"
    assert not (out / "report.json").is_symlink()
    assert (out / "report.json").read_text() == '{\n "a": 2,\n "b": 1\n}'  # sorted keys


def test_the_writability_probe_never_touches_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".write-test").symlink_to(victim)
    probe_writable(out)
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(out)) == [".write-test"]


def test_appending_through_a_dangling_symlink_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(AddpError, match="symbolic link") as e:
        open_append(out / "log.jsonl")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_modes_follow_the_umask(tmp_path):
    code = ("import os, sys; from pathlib import Path; os.umask(int(sys.argv[2], 8))\n"
            "from addp.runs.files import atomic_write\n"
            "atomic_write(Path(sys.argv[1]) / 'sub' / 'f.txt', lambda t: Path(t).write_text('x'))\n")
    for mask, file_mode, dir_mode in (("022", 0o644, 0o755), ("002", 0o664, 0o775), ("077", 0o600, 0o700)):
        root = tmp_path / mask
        subprocess.run([sys.executable, "-c", code, str(root), mask], check=True, cwd=Path(__file__).parents[2])
        assert stat.S_IMODE((root / "sub" / "f.txt").stat().st_mode) == file_mode
        assert stat.S_IMODE((root / "sub").stat().st_mode) == dir_mode


def test_only_our_dead_temp_files_are_cleaned(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    ours = tmp_path / f".addp-x.safetensors.{dead}.abcd1234.tmp"
    theirs = [tmp_path / f".x.safetensors.{dead}.word.tmp", tmp_path / f".addp-x.{dead}.NOTOURS.tmp",
              tmp_path / "notes.tmp"]
    for p in [ours, *theirs]:
        p.write_text("data")
    link = tmp_path / f".addp-y.{dead}.abcd1234.tmp"
    link.symlink_to(theirs[-1])
    assert remove_stale_temp_files(tmp_path) == [ours]
    assert all(p.exists() for p in theirs) and link.is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(AddpError, match="No space left") as e:
        atomic_write(path, fail)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["f.txt"] and path.read_text() == "old"


def _stats(tmp_path, sigma, **meta):
    path = tmp_path / "s.npz"
    save_stats(ReferenceStats(np.zeros(2), sigma, meta=meta), path)
    return path


@pytest.mark.parametrize("sigma, meta, match", [
    (np.array([[1.0, 0.0], [0.0, -1.0]]), {}, "not a covariance"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), {}, "not a covariance"),
    (np.eye(2), {"feature_extractor": 3}, "'feature_extractor' must be text"),
])
def test_bad_statistics_are_one_line(tmp_path, sigma, meta, match):
    with pytest.raises(AddpError, match=match) as e:
        load_stats(_stats(tmp_path, sigma, **meta))
    assert "\n" not in str(e.value)


def test_good_statistics_load(tmp_path):
    stats = load_stats(_stats(tmp_path, np.eye(2), feature_extractor="inception-v3-compat:abc"))
    assert stats.meta["feature_extractor"] == "inception-v3-compat:abc"
