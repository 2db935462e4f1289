"""metrics.jsonl, TensorBoard event files (read back from the record format) and progress."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from absl import logging as absl_logging
from tensorboardX.proto import event_pb2

from attnx.training.logging import MetricsWriter


def read_events(logdir: str) -> list[event_pb2.Event]:
    """Parses TFRecord files: [u64 length][u32 crc][data][u32 crc] per record."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


def scalars(events) -> dict[tuple[str, int], float]:
    return {
        (value.tag, event.step): value.simple_value
        for event in events
        for value in event.summary.value
        if value.HasField("simple_value")
    }


def read_lines(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir, total_steps=10) as writer:
        writer.write(1, {"train/loss": 2.5, "train/learning_rate": np.float32(0.1)})
        writer.write(2, {"train/loss": np.asarray(2.0), "eval/bleu": 12.5})
        # each write is flushed: readable before close
        assert [line["step"] for line in read_lines(workdir)] == [1, 2]
        writer.write_image(2, "attention/example_0", np.zeros((8, 6, 3), np.uint8))
        writer.write_image(2, "attention/gray", np.ones((4, 4, 1), np.float32) * 0.5)
        writer.write_text(2, "samples", "**2024-01-02**")
        with pytest.raises(ValueError, match="'eval/bad' must be a number"):
            writer.write(3, {"eval/bad": np.zeros(3)})
        with pytest.raises(ValueError, match="must be \\[height, width"):
            writer.write_image(3, "bad", np.zeros((4, 4)))
    assert read_lines(workdir) == [
        {"step": 1, "train/loss": 2.5, "train/learning_rate": pytest.approx(0.1)},
        {"step": 2, "train/loss": 2.0, "eval/bleu": 12.5},
    ]
    events = read_events(os.path.join(workdir, "tensorboard"))
    values = scalars(events)
    assert values[("train/loss", 1)] == 2.5 and values[("eval/bleu", 2)] == 12.5
    tags = {value.tag for event in events for value in event.summary.value}
    assert {"attention/example_0", "attention/gray"} <= tags
    assert any(tag.startswith("samples") for tag in tags)
    images = [v.image for e in events for v in e.summary.value if v.tag == "attention/example_0"]
    assert (images[0].height, images[0].width) == (8, 6)


def test_resume_drops_lines_after_the_restored_step(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, total_steps=10) as writer:
        for step in range(1, 6):
            writer.write(step, {"train/loss": float(step)})
        writer.write(4, {"eval/exact_match": 0.5})
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "train/lo')  # torn line: killed mid-write
    # restart from the checkpoint at step 4: steps 5 and 6 are redone.
    with MetricsWriter(workdir, total_steps=10, start_step=4) as writer:
        writer.write(5, {"train/loss": 50.0})
    assert [(line["step"], *line.keys()) for line in read_lines(workdir)] == [
        (1, "step", "train/loss"),
        (2, "step", "train/loss"),
        (3, "step", "train/loss"),
        (4, "step", "train/loss"),
        (4, "step", "eval/exact_match"),
        (5, "step", "train/loss"),
    ]
    assert read_lines(workdir)[-1]["train/loss"] == 50.0
    # Nothing is lost: the lines that left are kept beside the record.
    (dropped,) = [n for n in os.listdir(workdir) if n.startswith("metrics.jsonl.dropped-")]
    with open(os.path.join(workdir, dropped)) as f:
        assert f.read() == '{"step": 5, "train/loss": 5.0}\n{"step": 6, "train/lo\n'
    # TensorBoard: the new event file asks to purge the old steps > 4.
    events = read_events(os.path.join(workdir, "tensorboard"))
    purge = [e for e in events if e.HasField("session_log")]
    assert purge and purge[-1].session_log.status == event_pb2.SessionLog.START
    assert purge[-1].step == 5


def test_the_rewritten_record_keeps_its_permissions(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, total_steps=10) as writer:
        writer.write(1, {"train/loss": 1.0})
        writer.write(2, {"train/loss": 2.0})
    path = os.path.join(workdir, "metrics.jsonl")
    os.chmod(path, 0o644)
    with MetricsWriter(workdir, total_steps=10, start_step=1):
        pass
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [line["step"] for line in read_lines(workdir)] == [1]


def test_a_resume_with_nothing_to_drop_leaves_the_record_alone(tmp_path):
    workdir = str(tmp_path)
    with MetricsWriter(workdir, total_steps=10) as writer:
        writer.write(1, {"train/loss": 1.0})
    before = os.stat(os.path.join(workdir, "metrics.jsonl"))
    with MetricsWriter(workdir, total_steps=10, start_step=1) as writer:
        writer.write(2, {"train/loss": 2.0})
    after = os.stat(os.path.join(workdir, "metrics.jsonl"))
    assert before.st_ino == after.st_ino  # Appended to, not rewritten.
    assert not [n for n in os.listdir(workdir) if ".dropped-" in n]


def test_a_read_only_mode_appends_marked_rows_to_its_own_record(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(str(workdir), total_steps=10) as writer:
        writer.write(10, {"eval/bleu": 90.0})
    training = (workdir / "metrics.jsonl").read_text()
    for _ in range(2):  # Two evaluations of the same step: both rows stay.
        with MetricsWriter(str(workdir / "eval"), total_steps=10, mode="eval", start_step=3) as w:
            w.write(10, {"eval/bleu": 1.0})
    assert (workdir / "metrics.jsonl").read_text() == training
    rows = read_lines(str(workdir / "eval"))
    assert rows == [{"step": 10, "eval/bleu": 1.0, "mode": "eval"}] * 2
    assert os.listdir(workdir / "eval" / "tensorboard")
    # A mode that logs no row leaves no metrics file.
    with MetricsWriter(str(workdir / "visualize"), total_steps=10, mode="visualize"):
        pass
    assert not (workdir / "visualize" / "metrics.jsonl").exists()


def test_non_chief_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "other"), total_steps=5, is_chief=False)
    writer.write(1, {"train/loss": 1.0})
    writer.write_text(1, "t", "x")
    writer.progress(1, 1.0)
    writer.close()
    assert not os.path.exists(tmp_path / "other")


def test_progress_line_has_rate_eta_and_loss(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(
        absl_logging, "info", lambda fmt, *args: lines.append(fmt % args if args else fmt)
    )
    times = iter([0.0, 10.0, 20.0])
    with MetricsWriter(str(tmp_path), total_steps=1000, clock=lambda: next(times)) as writer:
        writer.progress(100, 3.0)
        writer.progress(200, 2.5)  # 10 steps/s
        writer.progress(400, 2.25)  # 20 steps/s, smoothed: 0.7 * 10 + 0.3 * 20 = 13
    assert lines[-3] == "step 100/1000 | loss 3.0000"
    assert lines[-2] == "step 200/1000 | 10.00 steps/s | ETA 0:01:20 | loss 2.5000"
    # 600 steps left at 13 steps/s = 46 s
    assert lines[-1] == "step 400/1000 | 13.00 steps/s | ETA 0:00:46 | loss 2.2500"


def test_the_first_progress_line_has_a_rate_once_the_clock_started(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(
        absl_logging, "info", lambda fmt, *args: lines.append(fmt % args if args else fmt)
    )
    times = iter([100.0, 109.0])  # Step 1 done (compiled) at 100 s; step 10 at 109 s.
    with MetricsWriter(str(tmp_path), total_steps=100, clock=lambda: next(times)) as writer:
        writer.start_clock(1)
        writer.progress(10, 3.0)
        writer.evaluation(
            10, {"eval/exact_match": 0.5, "eval/bleu": 61.25, "eval/decoded_examples": 8}
        )
    assert lines[-2] == "step 10/100 | 1.00 steps/s | ETA 0:01:30 | loss 3.0000"
    assert lines[-1] == "eval step 10 | exact_match 0.5 | bleu 61.25"


def test_the_evaluation_line_names_the_split_of_its_metrics(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(
        absl_logging, "info", lambda fmt, *args: lines.append(fmt % args if args else fmt)
    )
    with MetricsWriter(str(tmp_path), total_steps=100) as writer:
        writer.evaluation(100, {"test/checkpoint_step": 80, "test/chrf": 91.5})
        writer.evaluation(100, {"eval_averaged/chrf": 92.0})
    assert lines == [
        "test step 100 | checkpoint_step 80 | chrf 91.5",
        "eval_averaged step 100 | chrf 92",
    ]
