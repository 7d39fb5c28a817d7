"""Progress reporting: JSON lines, the human line with ETA, and failures that never stop training."""

import io
import json

from neox_runtime.train.progress import (JsonLinesReporter, LineReporter, ProgressReport, SafeReporter,
                                         format_line)


def _report(**over):
    fields = dict(step=10, total_steps=100, tokens=10240, loss=2.5, lr=1e-3, tokens_per_sec=2048.0, mfu=0.42,
                  eta_seconds=3725.0, latest_checkpoint_step=8)
    fields.update(over)
    return ProgressReport(**fields)


class Broken:
    calls = 0

    def report(self, progress):
        Broken.calls += 1
        raise ConnectionError("API server gone")


def test_failing_reporter_is_isolated_and_others_still_report(tmp_path):
    sink = JsonLinesReporter(tmp_path / "p.jsonl")
    safe = SafeReporter([Broken(), sink])
    for step in (1, 2, 3):
        safe.report(_report(step=step))
    assert safe.failures == 3 and Broken.calls == 3
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["mfu"] == 0.42 and "time" in rows[0]


def test_human_line_has_eta_throughput_and_checkpoint():
    line = format_line(_report(val_loss=2.1))
    assert "step 10/100" in line and "ETA 1h02m" in line and "2,048 tok/s" in line
    assert "MFU 42.0%" in line and "val_loss 2.1000" in line and "ckpt@8" in line
    stream = io.StringIO()
    LineReporter(stream).report(_report(event="preempted", eta_seconds=None, mfu=None))
    assert stream.getvalue().startswith("[preempted] ") and "ETA ?" in stream.getvalue()
