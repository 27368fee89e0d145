"""Request-level benchmark on a generated multi-configuration corpus (markdown on stdout).

A corpus is written with ``blis_model.synth`` into a temporary directory: a few
configurations (two model laws, several scheduler budgets, Poisson and bursty arrivals,
a KV-starved one with preemptions, one with prefix caching), journey + API traces,
heavy-tailed API overheads (lognormal with Pareto spikes), steps traced 1 in ``k`` with
``REQUEST_SNAPSHOT`` events on those steps (one experiment has none: its batches come
from journey reconstruction alone). Tables:

(a) per family (every registered one): TTFT, ITL (mean per request) and E2E MAPE per
    experiment on a temporal holdout (step model and alphas fit on the first 70% of each
    experiment's traced steps / the requests scheduled before, predicted on the requests
    scheduled after), plus a ``truth`` row (the generator's noise-free step law and true
    alphas, teacher-forced the same way: the irreducible error of the noise);
(b) alpha fits, median (robust) vs mean (least squares), fit on the early requests and
    scored on the later ones: α0, α1, α2 against the generator's truth, MAPE and
    absolute errors (ms) of the pre-queue and post-decode overheads;
(c) journey reconstruction vs snapshots on the steps that have them: exact-match share
    and relative error of the totals of prefill/decode counts, tokens and context sums,
    for the corpus as traced (1 in ``k``) and for the same runs traced at every step;
(d) request validation per experiment (failure rate and reasons), with a copy of one
    experiment whose export lost a share of its lines (what the failure-rate gate stops).

Usage: .venv/bin/python benchmarks/request_level.py [--experiments N] [--requests R]
       [--seed S] [--sample-every K]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from report import table  # benchmarks/report.py (scripts run from benchmarks/)

from blis_model.configuration.defaults import TRAIN_FRACTION as DEFAULT_TRAIN_FRACTION
from blis_model.configuration.experiment import load_experiment
from blis_model.ingest.reader import read_step_table
from blis_model.ingest.reconstruct import (
    COMPARED,
    SUMMARY_PAIRS,
    compare_with_snapshots,
    compare_with_summaries,
    reconstruct_steps,
)
from blis_model.ingest.requests import read_request_table, validate_requests
from blis_model.models.registry import FAMILIES
from blis_model.requests.accuracy import (
    METRICS,
    RequestData,
    load_request_data,
    request_accuracy,
    teacher_forced,
    temporal_request_holdout,
)
from blis_model.requests.alphas import AlphaFit, compare_alpha_fits
from blis_model.synth import LinearStepTime, SynthConfig, SynthTruth, write_corpus

TRAIN_FRACTION = DEFAULT_TRAIN_FRACTION


# ------------------------------------------------------------------------------ corpus


def configs(n: int, requests: int, seed: int, sample_every: int) -> dict[str, SynthConfig]:
    """``n`` experiments cycling through five configurations (two model laws)."""
    small = LinearStepTime(seed=seed, floor_us=2700.0, spike_prob=0.02)
    larger = LinearStepTime(base_us=3200.0, prefill_token_us=0.14, decode_us=24.0,
                            decode_ctx_us=0.005, seed=seed + 1, floor_us=3400.0,
                            spike_prob=0.02)
    base = SynthConfig(seed=seed, num_requests=requests, arrival_rate=40.0,
                       sample_every=sample_every, overhead_sigma=0.3,
                       overhead_spike_prob=0.05, overhead_spike_scale=10.0)
    templates = [
        ("llama31-8b-mnbt2048", dict(step_time_us=small)),
        ("llama31-8b-mnbt1024-prefix", dict(
            step_time_us=small, max_num_batched_tokens=1024, max_num_seqs=32,
            prefix_caching=True, alpha0_us=1200.0, alpha1_us=900.0, alpha2_us=3.0)),
        ("llama2-7b-bursty-kvstarved", dict(
            model="meta-llama/Llama-2-7b-hf", step_time_us=larger, arrival_cv=3.0,
            num_gpu_blocks=600, out_of_order=0.05, alpha0_us=600.0, alpha1_us=2500.0,
            alpha2_us=1.5)),
        ("llama2-7b-mnbt512-nosnap", dict(
            model="meta-llama/Llama-2-7b-hf", step_time_us=larger,
            max_num_batched_tokens=512, max_num_seqs=32, snapshots=False,
            arrival_rate=25.0)),
        ("llama31-8b-mnbt4096-seqs128", dict(
            step_time_us=small, max_num_batched_tokens=4096, max_num_seqs=128,
            arrival_rate=60.0, alpha0_us=1500.0, alpha2_us=4.0)),
    ]
    out = {}
    for i in range(n):
        name, changes = templates[i % len(templates)]
        out[f"e{i}-{name}"] = dataclasses.replace(base, seed=seed + i, **changes)
    return out


def corrupt_copy(src: Path, dst: Path, drop_share: float, seed: int) -> None:
    """Copy an experiment folder, dropping ``drop_share`` of its request-scope lines."""
    dst.mkdir(parents=True)
    (dst / "exp-config.yaml").write_bytes((src / "exp-config.yaml").read_bytes())
    lines = gzip.decompress((src / "traces.json.gz").read_bytes()).split(b"\n")
    rng = np.random.default_rng(seed)
    keep = [ln for ln in lines if b"llm_core" not in ln or rng.random() >= drop_share]
    (dst / "traces.json.gz").write_bytes(gzip.compress(b"\n".join(keep), mtime=0))


# ----------------------------------------------------------------------------- tables


def truth_alphas(cfg: SynthConfig) -> AlphaFit:
    """The generator's overheads (the median of its lognormal noise is 1)."""
    return AlphaFit("truth", cfg.alpha0_us, 0.0, cfg.alpha1_us, cfg.alpha2_us, 0, 0)


def truth_accuracy(d: RequestData, truth: SynthTruth, split: int) -> dict:
    """TTFT / ITL / E2E of the generator's noise-free law + true alphas on the holdout."""
    law = truth.config.step_time_us
    ids = np.array([b.step_id for b in truth.batches], np.int64)
    pred = np.array([law.mean_us(b) for b in truth.batches], np.float64)
    per_request = teacher_forced(d.requests, ids, pred, truth_alphas(truth.config))
    return request_accuracy(per_request, split)


def family_tables(items: list[RequestData], truths: dict[str, SynthTruth]) -> str:
    rows, means = [], []
    splits: dict[str, int] = {}
    for family in FAMILIES:
        t0 = time.perf_counter()
        result = temporal_request_holdout(items, family, TRAIN_FRACTION)
        seconds = time.perf_counter() - t0
        fam_rows = []
        for name, r in sorted(result.items()):
            splits[name] = r["split_step"]
            fam_rows.append({"family": family, "experiment": name,
                             "step MAPE": r["steps"]["mape"],
                             **{f"{m.upper()} MAPE": r[m]["mape"] for m in METRICS},
                             "requests": r["ttft"]["n"]})
        mean = {c: float(np.mean([r[c] for r in fam_rows]))
                for c in ("step MAPE", "TTFT MAPE", "ITL MAPE", "E2E MAPE")}
        rows += fam_rows + [{"family": family, "experiment": "**mean**", **mean}]
        means.append({"family": family, **mean, "fit+predict s": seconds})
    truth_rows = []
    for d in items:
        name = d.experiment.name
        acc = truth_accuracy(d, truths[name], splits[name])
        truth_rows.append({"family": "truth", "experiment": name,
                           **{f"{m.upper()} MAPE": acc[m]["mape"] for m in METRICS},
                           "requests": acc["ttft"]["n"]})
    truth_mean = {c: float(np.mean([r[c] for r in truth_rows]))
                  for c in ("TTFT MAPE", "ITL MAPE", "E2E MAPE")}
    rows += truth_rows + [{"family": "truth", "experiment": "**mean**", **truth_mean}]
    means.append({"family": "truth (noise-free law, true α)", **truth_mean,
                  "step MAPE": float("nan"), "fit+predict s": float("nan")})
    cols = ["family", "experiment", "step MAPE", "TTFT MAPE", "ITL MAPE", "E2E MAPE",
            "requests"]
    summary_cols = ["family", "step MAPE", "TTFT MAPE", "ITL MAPE", "E2E MAPE",
                    "fit+predict s"]
    return ("### (a) Request-level accuracy, temporal holdout (MAPE %, mean over "
            f"experiments; fit on the first {TRAIN_FRACTION:.0%} of each experiment)\n\n"
            + table(means, summary_cols)
            + "\n\nPer experiment:\n\n" + table(rows, cols))


def _split(d: RequestData) -> int:
    ids = np.sort(d.steps.column("step_id").to_numpy())
    return int(ids[min(int(round(TRAIN_FRACTION * len(ids))), len(ids) - 1)])


def alpha_table(items: list[RequestData], truths: dict[str, SynthTruth]) -> str:
    rows = []
    for d in items:
        cfg = truths[d.experiment.name].config
        split = _split(d)
        scheduled = np.nan_to_num(d.requests.column("scheduled_step").to_numpy(
            zero_copy_only=False), nan=split)
        train = d.requests.filter(pa.array(scheduled < split))
        test = d.requests.filter(pa.array(scheduled >= split))
        result = compare_alpha_fits(train, evaluate_on=test)
        rows.append({"experiment": d.experiment.name, "method": "truth",
                     "α0 µs": cfg.alpha0_us, "α1 µs": cfg.alpha1_us, "α2 µs/tok": cfg.alpha2_us})
        for method, r in result.items():
            f, e = r["fit"], r["errors"]
            rows.append({
                "experiment": "", "method": method,
                "α0 µs": f["alpha0_us"], "α1 µs": f["alpha1_us"], "α2 µs/tok": f["alpha2_us"],
                "α0 err %": 100 * (f["alpha0_us"] / cfg.alpha0_us - 1),
                "pre-queue MAPE": e["pre_queue"]["mape"],
                "pre-queue MAE ms": e["pre_queue"]["mae_ms"],
                "pre-queue med AE ms": e["pre_queue"]["median_ae_ms"],
                "post-decode MAPE": e["post_finish"]["mape"],
                "post-decode MAE ms": e["post_finish"]["mae_ms"],
                "post-decode med AE ms": e["post_finish"]["median_ae_ms"],
                "train/test req": f"{f['n_pre_queue']}/{e['pre_queue']['n']}"})
    cols = ["experiment", "method", "α0 µs", "α1 µs", "α2 µs/tok", "α0 err %",
            "pre-queue MAPE", "pre-queue MAE ms", "pre-queue med AE ms", "post-decode MAPE",
            "post-decode MAE ms", "post-decode med AE ms", "train/test req"]
    return ("### (b) Alpha fits: median (robust) vs mean, fit on early requests, scored on "
            "later ones (MAPE %, absolute errors ms)\n\n" + table(rows, cols))


TRUTH_PAIRS = {"pf_count": "num_prefill_reqs", "pf_tokens": "prefill_tokens",
               "pf_ctx_tokens": "prefill_ctx_tokens", "dc_count": "decode_count",
               "dc_ctx_sum": "decode_ctx_sum"}


def truth_share(rebuilt: pa.Table, truth: SynthTruth) -> float:
    """Share of the run's executed steps whose rebuilt batch equals the generator's in
    every compared column (a step missing from the rebuild counts as a mismatch)."""
    ids = truth.steps.column("step_id").to_numpy()
    have = rebuilt.column("step_id").to_numpy()
    pos = np.minimum(np.searchsorted(have, ids), len(have) - 1)
    ok = have[pos] == ids
    for ours, theirs in TRUTH_PAIRS.items():
        ok &= rebuilt.column(ours).to_numpy()[pos] == truth.steps.column(theirs).to_numpy()
    return float(ok.mean())


def agreement_rows(root: str, names: Sequence[str], label: str,
                   truths: dict[str, SynthTruth]) -> list[dict]:
    rows = []
    for name in names:
        exp = load_experiment(root, name)
        steps, _ = read_step_table(exp)
        requests, _ = read_request_table(exp)
        t0 = time.perf_counter()
        rebuilt, report = reconstruct_steps(requests, exp.server.max_num_batched_tokens,
                                            block_size=exp.server.block_size)
        seconds = time.perf_counter() - t0
        agreement = compare_with_snapshots(steps, rebuilt)
        summaries = compare_with_summaries(steps, rebuilt)
        row: dict = {"experiment": name, "tracing": label,
                     "snapshot steps": agreement["steps"],
                     "rebuilt steps": rebuilt.num_rows, "rebuild s": seconds,
                     "forced": report.forced_chunks, "summary steps": summaries["steps"],
                     "all steps = truth": truth_share(rebuilt, truths[name])}
        for c in COMPARED:
            a = agreement[c] if agreement["steps"] else {}
            row[f"{c} exact"] = a.get("exact_share", float("nan"))
            row[f"{c} rel err"] = a.get("total_rel_error", float("nan"))
        for c in SUMMARY_PAIRS:
            row[f"{c} vs summary"] = summaries[c]["exact_share"]
        rows.append(row)
    return rows


def reconstruction_table(sampled_root: str, full_root: str, names: Sequence[str],
                         sample_every: int, truths: dict[str, SynthTruth]) -> str:
    rows = agreement_rows(sampled_root, names, f"1 in {sample_every}", truths)
    rows += agreement_rows(full_root, names, "every step", truths)
    cols = (["experiment", "tracing", "snapshot steps", "rebuilt steps"]
            + [f"{c} {k}" for c in COMPARED for k in ("exact", "rel err")]
            + ["all steps = truth", "forced", "rebuild s"])
    summary_cols = (["experiment", "tracing", "summary steps"]
                    + [f"{c} vs summary" for c in SUMMARY_PAIRS])
    return ("### (c) Journey reconstruction vs REQUEST_SNAPSHOT (exact-match share of steps, "
            "relative error of the column total; n/a: no snapshots; every step of the run "
            "is rebuilt, the snapshot steps are compared; `all steps = truth`: share of all "
            "executed steps whose rebuilt batch equals the generator's)\n\n" + table(rows, cols)
            + "\n\nAgainst every traced step's BATCH_SUMMARY counts (exact-match share; "
            "what a corpus without snapshots can check):\n\n" + table(rows, summary_cols))


def validation_table(items: list[RequestData], extra: list[tuple[str, str]]) -> str:
    rows = []
    reports = [(d.experiment.name, d.validation) for d in items]
    for root, name in extra:
        exp = load_experiment(root, name)
        requests, _ = read_request_table(exp)
        reports.append((name, validate_requests(
            requests, name, max_num_batched_tokens=exp.server.max_num_batched_tokens)))
    for name, v in reports:
        rows.append({"experiment": name, "requests": v.n_requests, "failed": v.n_failed,
                     "failure rate %": 100 * v.failure_rate,
                     "gate 5%": "stop" if v.failure_rate > 0.05 else "pass",
                     "reasons": ", ".join(f"{k}={n}" for k, n in sorted(v.reasons.items()))
                     or "-"})
    return ("### (d) Request validation per experiment\n\n"
            + table(rows, ["experiment", "requests", "failed", "failure rate %", "gate 5%",
                           "reasons"]))


def corpus_table(truths: dict[str, SynthTruth], items: list[RequestData]) -> str:
    rows = []
    for d in items:
        t = truths[d.experiment.name]
        c = t.config
        rows.append({"experiment": d.experiment.name, "model": c.model.split("/")[-1],
                     "mnbt": c.max_num_batched_tokens, "seqs": c.max_num_seqs,
                     "arrival cv": c.arrival_cv, "requests": t.requests.num_rows,
                     "steps": t.steps.num_rows, "traced": d.steps.num_rows,
                     "snapshots": "yes" if c.snapshots else "no",
                     "preempted req": int((t.requests.column("num_preemptions")
                                           .to_numpy() > 0).sum()),
                     "prefix cache": "yes" if c.prefix_caching else "no"})
    return ("### Generated corpus\n\n" + table(rows, [
        "experiment", "model", "mnbt", "seqs", "arrival cv", "requests", "steps", "traced",
        "snapshots", "preempted req", "prefix cache"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=5)
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blis-request-bench-") as tmp:
        cfgs = configs(args.experiments, args.requests, args.seed, args.sample_every)
        sampled_root, full_root = f"{tmp}/sampled", f"{tmp}/full"
        truths = write_corpus(sampled_root, cfgs)
        write_corpus(full_root, {n: dataclasses.replace(c, sample_every=1, snapshots=True)
                                 for n, c in cfgs.items()})
        names = sorted(cfgs)
        bad_root, bad_name = f"{tmp}/corrupted", f"{names[0]}-lost-5pct-journey-lines"
        corrupt_copy(Path(sampled_root) / names[0], Path(bad_root) / bad_name, 0.05,
                     args.seed)
        items = [load_request_data(load_experiment(sampled_root, n)) for n in names]
        print(f"## Request-level benchmark ({len(names)} experiments × {args.requests} "
              f"requests, seed {args.seed}, steps traced 1 in {args.sample_every})\n")
        print(corpus_table(truths, items) + "\n")
        print(family_tables(items, truths) + "\n")
        print(alpha_table(items, truths) + "\n")
        print(reconstruction_table(sampled_root, full_root, names, args.sample_every,
                                   truths) + "\n")
        print(validation_table(items, [(bad_root, bad_name)]) + "\n")
    print(f"_total {time.perf_counter() - t0:.0f} s_")


if __name__ == "__main__":
    main()
