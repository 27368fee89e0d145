"""The manifest reports journey-reconstruction agreement per experiment, and the
request-level benchmark runs end to end on a tiny corpus."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blis_model.calibration import featurize
from blis_model.requests import stage as request_level
from blis_model.synth import SynthConfig, write_experiment

ROOT = Path(__file__).resolve().parents[1]
BASE = SynthConfig(seed=5, num_requests=80, arrival_rate=40.0, max_num_batched_tokens=1024,
                   max_num_seqs=32, num_gpu_blocks=300, sample_every=3)


def test_manifest_block_reports_reconstruction_agreement(tmp_path) -> None:
    write_experiment(str(tmp_path / "snap"), BASE)
    write_experiment(str(tmp_path / "nosnap"), dataclasses.replace(BASE, snapshots=False))
    items = [featurize.featurize(e) for e in featurize.load_experiments(str(tmp_path))]
    settings = request_level.RequestSettings()
    reports = {d.experiment.name: request_level.data_report(d, settings)
               for d in featurize.request_items(items)}
    block = request_level.release_block(reports, request_level.AlphaReport(None), settings)
    json.dumps(block, allow_nan=False)
    snap = block["experiments"]["snap"]["reconstruction"]["agreement"]
    assert snap["snapshots"]["steps"] > 0
    for column in ("pf_count", "pf_tokens", "pf_ctx_tokens", "dc_count", "dc_ctx_sum"):
        assert snap["snapshots"][column] == {"exact_share": 1.0, "total_rel_error": 0.0}
    nosnap = block["experiments"]["nosnap"]["reconstruction"]["agreement"]
    assert nosnap["snapshots"] is None
    assert nosnap["summaries"]["steps"] > 0
    assert nosnap["summaries"]["pf_tokens"]["exact_share"] == 1.0


@pytest.mark.parametrize("args", [["--experiments", "2", "--requests", "60"]])
def test_benchmark_prints_every_table(args) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "request_level.py"), *args],
                         capture_output=True, text=True, check=True, timeout=120,
                         cwd=ROOT).stdout
    for heading in ("### (a)", "### (b)", "### (c)", "### (d)"):
        assert heading in out
    assert "| picf | **mean** |" in out and "| truth | **mean** |" in out
    assert "| stop |" in out  # the corrupted copy fails the 5% gate
