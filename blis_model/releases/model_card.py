"""The human model card (``MODEL_CARD.md``) of a release, rendered from its manifest and
coefficients. Pure formatting: everything shown is in the machine-readable files too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PURPOSE = (
    "Step-time coefficients for BLIS, the discrete-event simulator of vLLM serving, learned "
    "from real vLLM step traces. `defaults.yaml`, `hardware_config.json` and `model_configs/` "
    "load into today's BLIS as-is (trained-physics backend); `coefficients.json` holds the "
    "release's native model, which `blis-model predict` evaluates per step."
)
EVALUATIONS = (
    ("in_sample", "In-sample (fit and scored on every step)"),
    ("temporal_holdout", "Temporal holdout (fit on the first 70% of each experiment's steps, "
                         "scored on the last 30%)"),
    ("leave_one_experiment_out", "Leave one experiment out (zero-shot: its configuration "
                                 "unseen in training)"),
)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
        return f"{value:.{digits + 1}g}"
    return f"{value:.{digits}f}"


def _coef(value: Any) -> str:
    return "–" if value is None else f"{float(value):.6g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def _metric_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = [[name, _num(r.get("mape")), _num(r.get("median_ape")), _num(r.get("p90_ape")),
             _num(r.get("n"))] for name, r in sorted(results.items())]
    scored = [r for r in results.values() if r.get("n") and r.get("mape") is not None]
    if len(scored) > 1:
        def mean(key: str) -> float:
            return sum(float(r[key]) for r in scored) / len(scored)

        rows.append(["**mean over experiments**", _num(mean("mape")), _num(mean("median_ape")),
                     _num(mean("p90_ape")), str(sum(int(r["n"]) for r in scored))])
    return rows


def _section_release(m: Mapping[str, Any]) -> list[str]:
    code = m.get("code") or {}
    corpus = m.get("corpus") or {}
    commit = code.get("git_commit") or "unknown (not a git checkout)"
    return [
        "## Release", "",
        f"- version: `{m.get('version')}`",
        f"- created: {m.get('created_at')}",
        f"- family: `{m.get('family')}`"
        + (f" (calibrated from release `{m['base_version']}`)" if m.get("base_version") else ""),
        f"- corpus: `{corpus.get('url')}` — {corpus.get('experiments')} experiments, "
        f"{corpus.get('steps')} steps; fingerprint `{str(corpus.get('fingerprint'))[:16]}…`",
        f"- code: blis-model {code.get('version')}, commit {commit}",
        "",
    ]


def _section_data(m: Mapping[str, Any]) -> list[str]:
    ingest = m.get("ingest") or {}
    rows = []
    for e in m.get("experiments", []):
        r = ingest.get(e["name"], {})
        rows.append([e["name"], e["model"], e["hardware"], e["tensor_parallelism"],
                     e["steps"], r.get("steps_bad_duration", 0), r.get("steps_duplicate", 0),
                     r.get("lines_malformed", 0)])
    return ["## Data", "", *_table(
        ["experiment", "model", "GPU", "TP", "steps used", "dropped: bad duration",
         "dropped: duplicate", "malformed lines"], rows), ""]


def _section_accuracy(metrics: Mapping[str, Any]) -> list[str]:
    out = ["## Accuracy (absolute percentage error of step time, %)", ""]
    s = metrics.get("summary") or {}
    if s:
        out += [f"Mean MAPE over experiments — in-sample {_num(s.get('in_sample_mape'))}, "
                f"temporal holdout {_num(s.get('temporal_mape'))}, leave-one-out "
                f"{_num(s.get('loo_mape'))} (median APE {_num(s.get('loo_median_ape'))}).", ""]
    for key, title in EVALUATIONS:
        results = metrics.get(key) or {}
        out += [f"### {title}", ""]
        if not results:
            out += ["Not available (needs at least two experiments / enough steps).", ""]
            continue
        out += [*_table(["experiment", "MAPE", "median APE", "p90 APE", "steps"],
                        _metric_rows(results)), ""]
    return out


def _section_replay(metrics: Mapping[str, Any]) -> list[str]:
    """A request fit's accuracy: TTFT / ITL / E2E of the replayed requests against the
    measured ones, in-sample and leave one experiment out, and the fit's convergence."""
    replay = metrics.get("request_replay") or {}
    if not replay:
        return []
    s = replay.get("summary") or {}
    out = ["## Accuracy (request latencies replayed vs measured, MAPE %)", "",
           "Every experiment's measured arrivals and tokens replayed through vLLM's "
           "scheduler with this release's step model and alphas; the fit used "
           f"{', '.join(f'`{n}`' for n in s.get('trained_on') or [])}.", ""]
    for key, title in (("in_sample", "In-sample"),
                       ("leave_one_experiment_out", "Leave one experiment out (fit on the "
                                                    "others)")):
        tables = replay.get(key) or {}
        if not tables:
            continue
        rows = []
        for name, t in sorted(tables.items()):
            acc = t.get("accuracy") or {}
            dist = t.get("distribution_ms") or {}
            rows.append([name + (" (overloaded)" if t.get("overloaded") else ""),
                         t.get("targets"),
                         *(_num((acc.get(m) or {}).get("mape")) for m in ("ttft", "itl", "e2e")),
                         f"{_num((dist.get('ttft') or {}).get('simulated_p90'))} / "
                         f"{_num((dist.get('ttft') or {}).get('measured_p90'))}",
                         f"{t.get('completed_simulated')} / {t.get('completed_measured')}"])
        prefix = "in_sample" if key == "in_sample" else "loo"
        rows.append(["**mean (not overloaded)**", "",
                     *(_num(s.get(f"{prefix}_{m}_mape")) for m in ("ttft", "itl", "e2e")), "",
                     ""])
        out += [f"### {title}", "", *_table(
            ["experiment", "requests scored", "TTFT", "ITL", "E2E",
             "TTFT p90 ms sim / measured", "completed sim / measured"], rows), ""]
    conv = replay.get("convergence") or {}
    if conv:
        its = conv.get("iterations") or []
        out += [f"Fit: {conv.get('method')}; {len(its) - 1} round(s), objective "
                + " → ".join(_num(i.get("objective")) for i in its)
                + f"; stopped: {conv.get('stopped')} ({_num(conv.get('seconds'), 1)} s).", ""]
    return out


KeyPath = tuple[str, ...]
_SKIP_KEYS = {"family", "params", "features", "calibration", "transfer_checks"}


def _is_table(value: Any) -> bool:
    """A coefficient table: ``[{"feature", "value", "unit"}, ...]`` (every family's unit)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(r, Mapping) and "feature" in r and "value" in r for r in value))


def _is_scalar(value: Any) -> bool:
    """A single named coefficient: ``{"value": number, "unit": ...}``."""
    return (isinstance(value, Mapping) and "value" in value and len(value) <= 3
            and isinstance(value["value"], int | float | None))


def _walk(obj: Any, path: KeyPath = ()) -> list[tuple[str, KeyPath, Any]]:
    """Coefficient tables and scalars anywhere in a model's ``to_dict``, with their paths.
    Matrices (covariances) and other bulk data are left to ``coefficients.json``."""
    if _is_table(obj):
        return [("table", path, obj)]
    if _is_scalar(obj):
        return [("scalar", path, obj)]
    found: list[tuple[str, KeyPath, Any]] = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not path and key in _SKIP_KEYS:
                continue
            found += _walk(value, (*path, str(key)))
    return found


def _label(path: KeyPath) -> str:
    return " / ".join(path) or "coefficients"


def _union(tables: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    names: list[str] = []
    for table in tables:
        names += [r["feature"] for r in table if r["feature"] not in names]
    return names


def _section_coefficients(m: Mapping[str, Any], coefficients: Mapping[str, Any]) -> list[str]:
    model = coefficients.get("model") or {}
    schema = {f["name"]: f for f in (m.get("feature_schema") or {}).get("features", [])}
    out = ["## Coefficients", "",
           f"Family `{model.get('family')}`; every set below is in `coefficients.json` "
           "(`model`). Features of kind *correction* are physical time estimates (µs) whose "
           "coefficient is a dimensionless correction (1 = runs at datasheet peak); "
           "*overhead* features are counts whose coefficient is µs per unit.", ""]
    if schema:
        out += ["### Features", "", *_table(
            ["feature", "kind", "unit", "meaning"],
            [[n, f.get("kind", ""), f.get("unit", ""), f.get("description", "")]
             for n, f in schema.items()]), ""]
    extras = [(k, v) for k, v in model.items() if k not in _SKIP_KEYS and isinstance(v, list)
              and v and all(isinstance(x, str) for x in v)]
    out += [f"- {k}: {', '.join(f'`{x}`' for x in v)}" for k, v in extras]
    out += [""] if extras else []
    entries = _walk(model)
    shared = [e for e in entries if e[1][:1] != ("per_config",)]
    per_config = [e for e in entries if e[1][:1] == ("per_config",) and len(e[1]) >= 2]
    for kind, path, value in shared:
        if kind == "table":
            out += [f"### {_label(path)}", "", *_table(
                ["feature", "coefficient", "unit"],
                [[r["feature"], _coef(r["value"]), r.get("unit", "")] for r in value]), ""]
    scalars = [(p, v) for k, p, v in shared if k == "scalar"]
    if scalars:
        out += [f"- {_label(p)}: {_coef(v['value'])} {v.get('unit', '')}".rstrip()
                for p, v in scalars] + [""]
    if per_config:
        keys = sorted({p[1] for _, p, _ in per_config})
        column = {k: f"c{i}" for i, k in enumerate(keys)}
        out += ["### Per-configuration sets", "",
                "Used for steps of these configurations; any other configuration uses the "
                "shared sets above.", ""]
        out += [f"- `{column[k]}` = `{k}`" for k in keys] + [""]
        subpaths: list[KeyPath] = []
        for _, p, _ in per_config:
            if p[2:] not in subpaths:
                subpaths.append(p[2:])
        for sub in subpaths:
            here = {p[1]: (kind, v) for kind, p, v in per_config if p[2:] == sub}
            tables = {k: v for k, (kind, v) in here.items() if kind == "table"}
            title = f"#### per configuration{': ' + _label(sub) if sub else ''}"
            if tables:
                by_key = {k: {r["feature"]: r["value"] for r in t} for k, t in tables.items()}
                units = {r["feature"]: r.get("unit", "") for t in tables.values() for r in t}
                rows = [[n, units.get(n, ""), *(_coef(by_key[k].get(n)) if k in by_key else "–"
                                               for k in keys)]
                        for n in _union(list(tables.values()))]
                out += [title, "", *_table(["feature", "unit", *column.values()], rows), ""]
            scal = {k: v for k, (kind, v) in here.items() if kind == "scalar"}
            if scal:
                unit = next(iter(scal.values())).get("unit", "")
                out += [title + (f" ({unit})" if unit else ""), "", *_table(
                    list(column.values()),
                    [[_coef(scal[k]["value"]) if k in scal else "–" for k in keys]]), ""]
    return out


def _ratio(value: Any) -> str:
    return "from 0" if value is None else f"×{float(value):.3g}"


def _range(r: Sequence[Any]) -> str:
    lo, hi = r
    return f"[{_coef(lo)}, {'∞' if hi is None else _coef(hi)}]"


def _section_calibration(coefficients: Mapping[str, Any]) -> list[str]:
    """How each configuration's terms were chosen (``model.calibration``): the candidates'
    time-ordered CV errors, the choice and why, and the terms that moved from their
    global value (ratio), flagging any at a bound of its physical range."""
    block = (coefficients.get("model") or {}).get("calibration") or {}
    per = block.get("per_config") or {}
    if not per:
        return []
    method = block.get("method") or {}
    kappa = method.get("bound_factor")
    out = ["## Per-configuration calibration", "",
           f"Choice of each configuration's terms: {method.get('rule', '')}. Candidates: "
           + ", ".join(f"`{c}`" for c in method.get("candidates", []))
           + " (`none`: the global or base terms unchanged; `host`: one factor on the "
           "host-time terms only — the overheads, µs per kernel launch / layer / request / "
           "step, paid by the machine's CPU and driver — the device terms kept; `scale`: one "
           "factor on the whole prediction; `terms@λ`: the configuration's own terms shrunk "
           "toward the reference with a prior worth λ steps). CV error: RMS relative error "
           "of each candidate on the validation blocks, %.", ""]
    out += [f"Physical ranges: {method.get('bounds', '')}, κ = {_num(kappa)}." if kappa
            else "Physical ranges: none (κ = ∞).", ""]
    labels = [str(c) for c in method.get("candidates", [])]
    for rec in per.values():
        labels += [c["candidate"] for c in rec.get("candidates", [])
                   if c["candidate"] not in labels]
    rows = []
    for key, rec in sorted(per.items()):
        cv = {c["candidate"]: c.get("cv_rmsre_pct") for c in rec.get("candidates", [])}
        factor = rec.get("scale") or rec.get("host_factor")
        choice = rec["choice"] + (f" (×{factor:.3g})" if factor else "")
        rows.append([f"`{key}`", rec.get("steps"), rec.get("folds"),
                     *(_num(cv.get(c)) for c in labels), f"**{choice}**", rec.get("reason", "")])
    out += [*_table(["configuration", "steps", "folds", *(f"CV {c}" for c in labels),
                     "choice", "why"], rows), ""]
    out += _machine_host_factors(block)
    for key, rec in sorted(per.items()):
        moved = rec.get("moved") or []
        if not moved:
            continue
        flagged = sum(1 for m in moved if m.get("at_bound"))
        out += [f"### Terms that moved: `{key}` ({rec['choice']}; {len(moved)} terms, "
                f"{flagged} at a bound)", "",
                *_table(["term", "global", "this configuration", "ratio", "physical range",
                         "at bound"],
                        [[m["term"], _coef(m["global"]), _coef(m["config"]), _ratio(m["ratio"]),
                          _range(m["range"]), f"⚠ {m['at_bound']}" if m.get("at_bound") else ""]
                         for m in moved]), ""]
    return out


def _machine_host_factors(block: Mapping[str, Any]) -> list[str]:
    """The machine host factors (``model.calibration.machine_host_factors``): per machine
    (the GPU field of a configuration key), the factor a configuration never seen there
    predicts with on the host-time terms, from the host effects of its configurations."""
    machines = block.get("machine_host_factors")
    if machines is None:
        return []
    terms = ", ".join(f"`{t}`" for t in block.get("host_terms") or [])
    out = ["### Machine host factors", "",
           "Host cost belongs to the machine (CPU, driver), not to the GPU's datasheet. An "
           "exp-config names no host, so the GPU of a configuration key stands for the "
           "machine it was measured on. A configuration never seen on a machine predicts "
           f"with the global terms whose host-time terms ({terms}) are × that machine's "
           "factor: the median host effect (host share of the steps under a "
           "configuration's terms over the global terms') of its configurations, or 1 when "
           "that median is within one standard error of 1.", ""]
    if not machines:
        return out + ["No machine has configurations with a known host effect.", ""]
    rows = [[m, _num(e.get("factor"), 3), _num(e.get("median"), 3),
             _num(e.get("standard_error"), 3),
             len(e.get("configurations") or {})] for m, e in sorted(machines.items())]
    return out + [*_table(["machine", "factor", "median effect", "standard error (log)",
                           "configurations"], rows), ""]


def _section_blis(m: Mapping[str, Any], coefficients: Mapping[str, Any]) -> list[str]:
    block = coefficients.get("blis_projection") or {}
    proj = ((m.get("metrics") or {}).get("blis_projection")) or {}
    out = ["## BLIS projection (`defaults.yaml`)", "",
           f"Betas: {block.get('beta_source', '')}.", ""]
    out += [*_table(["index", "term", "beta", "unit"],
                    [[b["index"], b["name"], _coef(b["value"]), b["unit"]]
                     for b in block.get("beta_coeffs", [])]), ""]
    out += [f"Alphas: {block.get('alpha_source', '')}.", ""]
    out += [*_table(["index", "term", "alpha", "unit"],
                    [[a["index"], a["name"], _coef(a["value"]), a["unit"]]
                     for a in block.get("alpha_coeffs", [])]), ""]
    per = proj.get("per_experiment") or {}
    if per:
        rows = [[name, _num(r["model"]["mape"]), _num(r["projection"]["mape"]),
                 _num(r.get("mape_loss")), _num(r["projection_vs_model"]["mape"]),
                 _num(r["blis_shipped"]["mape"])] for name, r in sorted(per.items())]
        s = proj.get("summary") or {}
        rows.append(["**mean**", _num(s.get("model_mape")), _num(s.get("projection_mape")),
                     _num(s.get("mape_loss")), "", _num(s.get("blis_shipped_mape"))])
        out += ["Accuracy the projection loses (in-sample MAPE vs measured, %):", "",
                *_table(["experiment", "release model", "BLIS projection", "loss (points)",
                         "projection vs model", "BLIS shipped betas"], rows), ""]
    out += ["Use it: `blis run --model <lower-cased model id> --hardware <GPU> --tp <TP> "
            "--defaults-filepath defaults.yaml ...` from the release folder (BLIS finds "
            "`hardware_config.json` and `model_configs/<name>/config.json` beside it).", ""]
    return out


def _section_problems(m: Mapping[str, Any]) -> list[str]:
    out = ["## Ingest problems", ""]
    any_problem = False
    for name, r in sorted((m.get("ingest") or {}).items()):
        problems = r.get("problems") or []
        if not problems:
            continue
        any_problem = True
        total = r.get("problems_total", len(problems))
        more = f" (first {len(problems)} of {total})" if total > len(problems) else ""
        out.append(f"- `{name}`{more}:")
        out += [f"  - `{p}`" for p in problems]
    if not any_problem:
        out.append("None: every line of every trace file was readable.")
    return [*out, ""]


REQUEST_EVALUATIONS = (
    ("in_sample", "In-sample (release model + pooled alphas, every request)"),
    ("temporal_holdout", "Temporal holdout (model and alphas fit before each experiment's "
                         "70% step, scored on the requests scheduled after it)"),
)


def _section_requests(m: Mapping[str, Any]) -> list[str]:
    """Request-level data, fitted alphas and TTFT / ITL / E2E accuracy (when the corpus
    has journey + API traces)."""
    block = m.get("request_level") or {}
    metrics = (m.get("metrics") or {}).get("request_level") or {}
    if not block and not metrics:
        return []
    out = ["## Request level", ""]
    alphas = block.get("alphas") or {}
    if alphas.get("fit"):
        rows = [["pooled (defaults.yaml)", _coef(alphas["pooled"]["alpha0_us"]),
                 _coef(alphas["pooled"]["alpha1_us"]), _coef(alphas["pooled"]["alpha2_us"]),
                 alphas["pooled"]["n_pre_queue"]]]
        rows += [[f"`{k}`", _coef(a["alpha0_us"]), _coef(a["alpha1_us"]), _coef(a["alpha2_us"]),
                  a["n_pre_queue"]] for k, a in sorted((alphas.get("per_config") or {}).items())]
        out += [f"Alphas: {alphas.get('source', '')}.", "",
                *_table(["set", "α0 queueing µs", "α1 post-decode µs", "α2 µs/output token",
                         "requests"], rows), ""]
    exps = block.get("experiments") or {}
    if exps:
        rows = [[name, r["validation"]["n_requests"],
                 r["validation"].get("n_failed", r["validation"].get("n_invalid")),
                 ", ".join(f"{k}={v}" for k, v in r["validation"]["reasons"].items()) or "–",
                 r.get("steps_reconstructed", "–"),
                 _num((r.get("overload") or {}).get("wait_growth")),
                 "yes" if r.get("overloaded") else "no"] for name, r in sorted(exps.items())]
        out += [*_table(["experiment", "requests", "failed validation", "reasons",
                         "steps rebuilt from journeys", "queue wait growth", "overloaded"],
                        rows), ""]
        notes = [(name, note) for name, r in sorted(exps.items()) for note in r.get("notes", [])]
        out += [f"- `{name}`: {note}" for name, note in notes] + ([""] if notes else [])
    for name, why in sorted((block.get("excluded") or {}).items()):
        out.append(f"- `{name}` excluded from training: {why}")
    if block.get("excluded"):
        out.append("")
    for key, title in REQUEST_EVALUATIONS:
        results = metrics.get(key) or {}
        if not results:
            continue
        rows = [[name, *(_num((r.get(x) or {}).get("mape")) for x in ("ttft", "itl", "e2e")),
                 _num((r.get("ttft") or {}).get("n"))] for name, r in sorted(results.items())]
        out += [f"### {title}", "", "MAPE (%) per experiment:", "",
                *_table(["experiment", "TTFT", "ITL", "E2E", "requests"], rows), ""]
    return out


PLOT_CAPTIONS = {
    "predicted_vs_measured": "Predicted vs measured step time, every step (µs, log-log).",
    "error_by_regime": "Signed step-time error (%) by batch regime and experiment.",
    "learning_curve": "Temporal-holdout error (%) against the number of training steps.",
}


def _stem_rank(path: Any, order: list[str]) -> int:
    stem = str(path).rsplit("/", 1)[-1].removesuffix(".png")
    return order.index(stem) if stem in order else len(order)


def _section_plots(m: Mapping[str, Any]) -> list[str]:
    """Links to the release's ``plots/*.png`` (relative to the release folder)."""
    block = m.get("plots") or {}
    files = block.get("files") or []
    if not files:
        return []
    order = list(PLOT_CAPTIONS)
    out = ["## Plots", ""]
    for path in sorted(files, key=lambda p: (_stem_rank(p, order), str(p))):
        stem = str(path).rsplit("/", 1)[-1].removesuffix(".png")
        out += [f"### {stem.replace('_', ' ')}", "", PLOT_CAPTIONS.get(stem, ""), "",
                f"![{stem}]({path})", ""]
    if block.get("learning_curve_skipped"):
        out += [f"No learning curve: {block['learning_curve_skipped']}.", ""]
    return out


def render(manifest: Mapping[str, Any], coefficients: Mapping[str, Any]) -> str:
    """The model card markdown of a release."""
    lines = [f"# BLIS step-time model — release {manifest.get('version')}", "",
             "## Purpose", "", PURPOSE, ""]
    lines += _section_release(manifest)
    lines += _section_data(manifest)
    metrics = manifest.get("metrics") or {}
    lines += (_section_replay(metrics) if metrics.get("request_replay")
              else _section_accuracy(metrics))
    lines += _section_plots(manifest)
    lines += _section_coefficients(manifest, coefficients)
    lines += _section_calibration(coefficients)
    lines += _section_blis(manifest, coefficients)
    lines += _section_requests(manifest)
    lines += _section_problems(manifest)
    return "\n".join(lines).rstrip() + "\n"
