"""Golden vectors of the Go evaluator (deploy/goeval): the committed file is what the
Python library computes today, and the Go package reproduces it.

A feature, aggregation or release-schema change on the Python side fails here until the
golden vectors are regenerated
(``python -m blis_model.releases.golden_vectors deploy/goeval/testdata``) and the Go
evaluator passes them again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blis_model.releases import golden_vectors as golden

ROOT = Path(__file__).resolve().parent.parent
GOEVAL = ROOT / "deploy" / "goeval"
TESTDATA = GOEVAL / "testdata"
REGENERATE = "python -m blis_model.releases.golden_vectors deploy/goeval/testdata"


def _diff(a: Any, b: Any, rel: float, path: str = "") -> list[str]:
    """Where two JSON documents differ: structure and strings exactly, numbers to ``rel``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], rel, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _diff(x, y, rel, f"{path}[{i}]")]
    numbers = (int, float)
    if (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool)):
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _committed() -> dict[str, Any]:
    return json.loads((TESTDATA / golden.GOLDEN_FILE).read_text())


def test_committed_vectors_are_what_python_predicts_from_the_committed_releases() -> None:
    """No refit: the committed releases' coefficients, rebuilt and predicted by today's
    features and families, give the committed golden vectors (1e-12 relative)."""
    committed = _committed()
    coefficients = {family: json.loads((TESTDATA / path / "coefficients.json").read_text())
                    for family, path in committed["releases"].items()}
    rebuilt = json.loads(golden.dumps_json(golden.build_golden(coefficients)))
    problems = _diff(rebuilt, committed, 1e-12)
    assert not problems, (f"golden vectors are stale ({len(problems)} differences, first: "
                          f"{problems[:5]}); run `{REGENERATE}` and make `go test` pass")


REFIT_TOLERANCE = 1e-7
"""Relative tolerance of refitted coefficients and vectors. Every family's fit ends at its
optimum to rounding (closed-form and NNLS solves; the quantile fits are polished by
Newton steps, ``models.quantile.newton_polish``), where summation order moves results by
~1e-10 (measured: reversed rows, other BLAS kernels); 1e-7 leaves three orders of margin
and still catches any change of the fit itself."""


def _compare_refit(folder: Path, written: list[Path]) -> list[str]:
    """Differences between refitted golden files and the committed ones. A release
    manifest's checksums hash the refit's bytes (the last digits may move): they are
    checked against those bytes instead."""
    assert {p.relative_to(folder) for p in written} == {
        p.relative_to(TESTDATA) for p in TESTDATA.rglob("*") if p.is_file()}
    problems = []
    for path in written:
        rel = path.relative_to(folder)
        new, old = json.loads(path.read_text()), json.loads((TESTDATA / rel).read_text())
        if path.name == "manifest.json":
            for name, digest in new.pop("files").items():
                data = (path.parent / name).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    problems.append(f"{rel}: checksum of {name}")
            old.pop("files")
        problems += _diff(new, old, REFIT_TOLERANCE, str(rel))
    return problems


def test_regenerated_golden_files_equal_the_committed_ones(tmp_path: Path) -> None:
    """Refit every family on the synthetic corpus: the same releases and vectors."""
    problems = _compare_refit(tmp_path, golden.write_golden(tmp_path))
    assert not problems, (f"golden files are stale ({len(problems)} differences, first: "
                          f"{problems[:5]}); run `{REGENERATE}` and make `go test` pass")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="OpenBLAS core types are named for x86-64 CPUs")
@pytest.mark.parametrize("core", ["Nehalem", "Haswell"])
def test_refit_is_the_same_with_another_cpus_blas_kernels(core: str, tmp_path: Path) -> None:
    """Another CPU runs other BLAS kernels (other summation orders): forcing OpenBLAS's
    kernels for another core type must give the same refit (what a fresh machine of
    another vendor sees)."""
    env = {**os.environ, "OPENBLAS_CORETYPE": core, "OPENBLAS_NUM_THREADS": "1"}
    code = ("import sys; from blis_model.releases import golden_vectors as g; "
            "print('\\n'.join(str(p) for p in g.write_golden(sys.argv[1])))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    problems = _compare_refit(tmp_path, [Path(p) for p in result.stdout.split()])
    assert not problems, (f"the refit depends on the BLAS kernels ({len(problems)} "
                          f"differences with {core}'s, first: {problems[:5]})")


def test_golden_covers_every_family_and_the_hard_cases() -> None:
    committed = _committed()
    assert committed["schema"] == golden.SCHEMA
    assert {c["release"] for c in committed["cases"]} == set(golden.FAMILIES)
    deps = committed["deployments"]
    assert any(d["tensor_parallelism"] > 1 for d in deps.values())
    assert any(k.split("|")[3] == "fp8" for k in committed["config_keys"].values())
    assert any("mixtral" in d["model"].lower() for d in deps.values())  # MoE
    sizes = {name: len(b["requests"]) for name, b in committed["batches"].items()}
    assert sizes["empty"] == 0 and max(sizes.values()) > 1024
    assert {c["calibrated"] for c in committed["cases"]} == {True, False}
    # a configuration never seen on a machine with a calibrated configuration (H200)
    # predicts with the machine's host factor (families with a host part)
    scaled = {c["release"] for c in committed["cases"] if c["machine_host_factor"] != 1.0
              and not c["calibrated"] and c["calibration_choice"] is None}
    assert {"picf", "hfd_tl", "bsr_ard"} <= scaled
    machine = {c["config_key"].split("|")[1] for c in committed["cases"]
               if c["release"] == "picf" and c["machine_host_factor"] != 1.0}
    assert "H200" in machine and any(c["calibrated"] and c["config_key"].split("|")[1] == "H200"
                                     for c in committed["cases"] if c["release"] == "picf")


def test_batch_to_steps_aggregates_like_ingest() -> None:
    steps = golden.batch_to_steps([golden.Request("prefill", 80, 20, 100),
                                   golden.Request("decode", 1, 220, 100, 14, 1)],
                                  golden.StepState(running_depth=2))
    assert steps["pf_tokens_sq"] == 6400 and steps["pf_ctx_tokens"] == 1600
    assert steps["pf_ctx_max"] == 100 and steps["pf_sampling"] == 1
    assert steps["dc_ctx_sum"] == 220 and steps["dc_count"] == 1
    assert steps["blocks_allocated"] == 14 and steps["preempted_before"] == 1
    assert golden.batch_to_steps([])["pf_count"] == 0


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("`go` is not installed: CI must run the Go evaluator's tests "
                        "(make go-toolchain installs Debian's golang-go)")
        pytest.skip("`go` is not installed (make go-toolchain installs it); the Go "
                    "evaluator's golden tests did not run")
    return go


@pytest.mark.parametrize("command", [["vet", "./..."], ["test", "-count=1", "./..."]],
                         ids=["go-vet", "go-test"])
def test_go_evaluator(command: list[str]) -> None:
    env = {**os.environ, "GOTOOLCHAIN": "local",
           "GOCACHE": os.environ.get("GOCACHE", str(Path.home() / ".cache" / "go-build"))}
    result = subprocess.run([_go(), *command], cwd=GOEVAL, capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"go {' '.join(command)} failed:\n{output}"


def test_go_sources_are_gofmt_clean() -> None:
    gofmt = str(Path(_go()).resolve().parent / "gofmt")
    result = subprocess.run([gofmt, "-l", "."], cwd=GOEVAL, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"gofmt -l lists unformatted files:\n{result.stdout}{result.stderr}")
