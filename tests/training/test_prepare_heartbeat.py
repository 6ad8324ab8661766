"""A warm start running in its own process reports its progress while it runs."""

import logging
import sys
import textwrap

import pytest

from realm.errors import StageFailed
from realm.training.prepare import _run_warm_start, heartbeat_line

CHILD = textwrap.dedent("""
    import json, sys, time
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    time.sleep(0.3)  # loading
    with open(run_dir + "/metrics.jsonl", "a") as f:
        for step in range(1, steps + 1):
            time.sleep(0.05)
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\\n")
            f.flush()
    print(json.dumps({"steps": steps}))
""")


def test_a_warm_start_logs_step_rate_and_time_left_while_it_runs(tmp_path, caplog):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with caplog.at_level(logging.INFO, logger="realm.training.prepare"):
        _run_warm_start([sys.executable, str(script), str(tmp_path), "30"], "the test stage",
                        run_dir=str(tmp_path), steps=30, heartbeat_s=0.25)
    lines = [r.getMessage() for r in caplog.records]
    beats = [line for line in lines if line.startswith("the test stage: step ")]
    assert beats, lines
    assert all(" / 30 (" in line for line in beats)
    assert any("steps/s" in line and "left" in line for line in beats), beats
    steps = [int(line.split("step ")[1].split(" ")[0]) for line in beats]
    assert steps == sorted(steps) and 1 <= steps[0] <= 30
    assert lines[-1] == 'the test stage: {"steps": 30}'  # its summary line, once done


def test_a_failed_warm_start_names_its_own_error_line(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.stderr.write('python -m realm ict: error: corpus: no such "
                      "directory x\\n')\nsys.exit(1)\n")
    with pytest.raises(StageFailed, match=r"the test stage failed \(exit 1\): corpus: no such "
                                          r"directory x$"):
        _run_warm_start([sys.executable, str(script)], "the test stage", heartbeat_s=0.1)


def test_heartbeat_line_before_the_first_step_and_without_a_total():
    assert heartbeat_line("ICT", 42.4, None, 100, None) == "ICT: running for 42 s (no training step yet)"
    assert heartbeat_line("ICT", 60, 10, None, (30, 0)) == "ICT: step 10, 0.33 steps/s"
    assert heartbeat_line("ICT", 60, 50, 1000, (20, 10)) == \
        "ICT: step 50 / 1000 (5%), 1.00 steps/s, about 16 min left"
