"""Progress: a bar on a terminal, one plain line per interval in a file, the same numbers in both."""
import io
import json
import re

import pytest
import torch

import addp
from addp.errors import AddpError
from addp.runs.progress import Progress
from addp.runtime.distributed import DistInfo
from addp.training.data import DigitsDataset, make_loader
from addp.training.stages import TokenizerStage
from addp.training.trainer import TrainConfig, Trainer

LINE = re.compile(r"^tokenizer: step (\d+)/10 \(\d+%\) \| [\d.]+ step/s \| (?:img/s ([\d.]+) \| loss ([\d.]+) \| "
                  r"lr ([\d.e+-]+) \| )?[\d:]+ elapsed, [\d:?]+ left$")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def train_tokenizer(tmp_path, stream, monkeypatch, interval="0"):
    """Ten steps of the tokenizer stage with its progress written to `stream`; returns log.jsonl's rows."""
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setenv("ADDP_PROGRESS_INTERVAL", interval)
    monkeypatch.delenv("ADDP_PROGRESS", raising=False)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=10, batch_size=8, lr=1e-3, log_every=5, ckpt_every=1000)
    trainer = Trainer(TokenizerStage(addp.create_model("vqgan_small")), cfg, tmp_path, DistInfo(), identity={})
    trainer.maybe_resume(None, force=False)
    data = DigitsDataset("train")
    trainer.fit(lambda start: iter(make_loader(data, 8, 0, 0, 1, start, 0)))
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_a_file_gets_plain_lines_with_the_logged_numbers(tmp_path, monkeypatch):
    stream = io.StringIO()
    rows = train_tokenizer(tmp_path, stream, monkeypatch)
    text = stream.getvalue()
    assert "\r" not in text
    lines = [LINE.match(line) for line in text.splitlines() if line.startswith("tokenizer:")]
    assert len(lines) == 10 and all(lines), text
    assert [int(m.group(1)) for m in lines] == list(range(1, 11))
    logged = {row["step"]: row for row in rows if "loss" in row}
    for m in lines[4::5]:  # steps 5 and 10: the numbers of that step's log row
        row = logged[int(m.group(1))]
        assert float(m.group(3)) == pytest.approx(row["loss"], abs=1e-4)
        assert float(m.group(4)) == pytest.approx(row["lr"], rel=1e-2)
        assert float(m.group(2)) == pytest.approx(row["images_per_s"], abs=0.051)


@pytest.mark.usefixtures("one_thread")
def test_a_terminal_gets_a_bar_with_the_same_numbers(tmp_path, monkeypatch):
    stream = Terminal()
    rows = train_tokenizer(tmp_path, stream, monkeypatch)
    redraws = [part.split("\n")[0] for part in stream.getvalue().split("\r") if part.strip()]
    last = redraws[-1]  # the bar's final redraw, written by its close
    row = [r for r in rows if "loss" in r][-1]
    assert "10/10" in last and f"loss={row['loss']:.4f}" in last and f"lr={row['lr']:.2e}" in last, last
    assert f"img/s={row['images_per_s']:.1f}" in last


def test_lines_come_once_per_interval_and_at_the_end():
    stream = io.StringIO()
    with Progress(total=1000, desc="x", unit="img", file=stream, interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("x: img 1/1000 (0%)") and lines[1].startswith("x: img 1000/1000")
    assert lines[1].endswith("left") and "img/s" in lines[1]


def test_iteration_without_a_total_and_the_forced_modes(monkeypatch):
    stream = io.StringIO()
    assert list(Progress(range(3), desc="batches", unit="batch", file=stream, interval=0)) == [0, 1, 2]
    assert stream.getvalue().count("\n") == 3 and "batch 3/3" in stream.getvalue()
    monkeypatch.setenv("ADDP_PROGRESS", "off")
    quiet = io.StringIO()
    list(Progress(range(3), file=quiet))
    assert quiet.getvalue() == ""
    monkeypatch.setenv("ADDP_PROGRESS", "bars")
    with pytest.raises(AddpError, match="ADDP_PROGRESS='bars'"):
        Progress(range(3), file=quiet)
    monkeypatch.setenv("ADDP_PROGRESS", "lines")
    monkeypatch.setenv("ADDP_PROGRESS_INTERVAL", "soon")
    with pytest.raises(AddpError, match="ADDP_PROGRESS_INTERVAL='soon'"):
        Progress(range(3), file=quiet)
