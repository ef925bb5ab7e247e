"""The GPU check script runs every stage on CPU with a tiny config, so it cannot rot."""

import json

from benchmarks.gpu_check import main


def test_every_stage_runs_and_is_measured_next_to_its_estimate(tmp_path, fake_data_with_harmbench):
    out = tmp_path / "check.json"
    result = main(["--config", "tiny-llama", "--device", "cpu", "--samples", "4", "--seq-len", "32", "--steps", "1", "--out", str(out)])
    stages = {row["stage"]: row for row in json.loads(out.read_text())["stages"]}
    assert stages == {row["stage"]: row for row in json.loads(json.dumps(result))["stages"]}
    for name in ("quarot/gptq", "gptq/gptq", "ostquant/calibration", "aaq/teachers", "aaq/calibration", "aaq/eval", "aaq/export_aaq", "aaq/export_compressed-tensors"):
        assert stages[name]["seconds"] > 0 and stages[name]["peak_host"] > 0, name
    for row in stages.values():
        if row["estimate"] is not None:
            # A tiny model's peaks are the interpreter's: the planner's baseline must be of that size.
            assert 0.4 < row["estimate"]["host"] / row["peak_host"] < 2.5, row
