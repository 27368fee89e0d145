"""Artifacts a reviewer reads in the Prefect UI: the release's model card, its metrics per
experiment (and per family when the release compared several) and its plots.

Plots come from the release folder (``plots/*.png``). They are embedded as
``data:`` URLs in markdown artifacts (the UI renders markdown images as ``<img>``), because
a release store is usually not reachable from a browser; Prefect's image artifacts take a
URL and print it in full under the image, which for a data URL is 100 kB of text.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from blis_model.releases import plots
from blis_model.releases.files import MODEL_CARD
from blis_model.releases.read import load_release
from blis_model.storage import filesystem, join, redact, storage_errors
from tasks.policy import RETRIES, RETRY_DELAYS, transient

KEY_PREFIX = "blis"


def _key(*parts: str) -> str:
    """An artifact key: lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join((KEY_PREFIX, *parts)).lower()).strip("-")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def release_plots(url: str) -> dict[str, bytes]:
    """``plots/*.png`` of the release folder (empty when it has none)."""
    root = join(url, plots.PLOTS_DIR)
    fs, path = filesystem(root, None)
    with storage_errors(root, None):
        fs.invalidate_cache(path)
        try:
            found = fs.glob(f"{path.rstrip('/')}/*.png")
        except FileNotFoundError:
            return {}
        return {f"{plots.PLOTS_DIR}/{p.rsplit('/', 1)[-1]}": fs.cat_file(p) for p in found}


def _read_text(url: str, name: str) -> str:
    target = join(url, name)
    fs, path = filesystem(target, None)
    with storage_errors(target, None):
        try:
            return fs.cat_file(path).decode()
        except FileNotFoundError:
            return ""


#: Metric columns of the metrics table artifact: MAPE in %, two decimals. Short headers,
#: so that the table fits the Prefect UI's artifact page without a horizontal scroll.
METRIC_COLUMNS: dict[str, str] = {
    "in_sample_mape": "in-sample %", "temporal_mape": "temporal %", "loo_mape": "LOO %",
    "blis_projection_mape": "BLIS proj. %"}


def _round(value: Any, digits: int = 2) -> float | None:
    """A metric for a table: rounded, None when missing or not finite."""
    if value is None:
        return None
    number = float(value)
    return round(number, digits) if math.isfinite(number) else None


def metrics_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per experiment (steps, in-sample / temporal / leave-one-out / BLIS
    projection MAPE %), the mean over experiments (what the model card reports), and one
    row per candidate family when the family was chosen by validation
    (``metrics.family_selection``). Every MAPE is in % with two decimals."""
    metrics = manifest.get("metrics") or {}
    if metrics.get("request_replay"):
        return replay_rows(metrics["request_replay"])
    proj = ((metrics.get("blis_projection") or {}).get("per_experiment")) or {}

    def mape(kind: str, name: str) -> Any:
        return ((metrics.get(kind) or {}).get(name) or {}).get("mape")

    def row(name: str, steps: Any, values: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "steps": steps,
                **{label: _round(values.get(key)) for key, label in METRIC_COLUMNS.items()}}

    rows = []
    for exp in manifest.get("experiments", []):
        name = exp["name"]
        rows.append(row(name, exp.get("steps"), {
            "in_sample_mape": mape("in_sample", name),
            "temporal_mape": mape("temporal_holdout", name),
            "loo_mape": mape("leave_one_experiment_out", name),
            "blis_projection_mape": ((proj.get(name) or {}).get("projection") or {}).get(
                "mape")}))
    s = metrics.get("summary") or {}
    ps = ((metrics.get("blis_projection") or {}).get("summary")) or {}
    rows.append(row(f"mean over experiments ({manifest.get('family')})",
                    (manifest.get("corpus") or {}).get("steps"),
                    {**s, "blis_projection_mape": ps.get("projection_mape")}))
    selection = metrics.get("family_selection") or {}
    for score in selection.get("scores") or []:
        chosen = " (chosen)" if score.get("family") == selection.get("winner") else ""
        rows.append(row(f"family {score.get('family')}{chosen}", None, score))
    return rows


def replay_rows(replay: dict[str, Any]) -> list[dict[str, Any]]:
    """A request fit's metrics table: per experiment, replayed-vs-measured TTFT / ITL /
    E2E MAPE % in-sample and leave one experiment out, then the means."""
    loo = replay.get("leave_one_experiment_out") or {}

    def mapes(table: dict[str, Any] | None, prefix: str) -> dict[str, float | None]:
        acc = (table or {}).get("accuracy") or {}
        return {f"{prefix}_{m}_mape": None if (acc.get(m) or {}).get("mape") is None
                else round(float(acc[m]["mape"]), 2) for m in ("ttft", "itl", "e2e")}

    rows = [{"scope": "experiment", "name": name, "overloaded": bool(t.get("overloaded")),
             "requests": t.get("targets"), **mapes(t, "in_sample"), **mapes(loo.get(name), "loo")}
            for name, t in sorted((replay.get("in_sample") or {}).items())]
    s = replay.get("summary") or {}
    rows.append({"scope": "mean", "name": "mean over experiments (not overloaded)",
                 "overloaded": False, "requests": None,
                 **{k: None if s.get(k) is None else round(float(s[k]), 2)
                    for k in (f"{p}_{m}_mape" for p in ("in_sample", "loo")
                              for m in ("ttft", "itl", "e2e"))}})
    return rows


PLOT_CAPTIONS = {
    "predicted_vs_measured": "Predicted vs measured step time, every step (log-log).",
    "error_by_regime": "Signed step-time error by batch regime and experiment.",
    "learning_curve": "Held-out error against the number of training steps.",
    "latency_cdfs": "Replayed (dashed) vs measured (solid) TTFT, ITL and E2E per experiment.",
}


def plots_markdown(version: str, link: str, images: dict[str, bytes]) -> str:
    """Every plot of a release, inline, with a caption and its file in the release."""
    lines = [f"# Plots of release {version}", ""]
    for name, png in sorted(images.items()):
        stem = name.rsplit("/", 1)[-1].removesuffix(".png")
        lines += [f"## {stem.replace('_', ' ')}", "", PLOT_CAPTIONS.get(stem, ""), "",
                  f"![{stem}]({_data_url(png)})", "", f"`{link}/{name}`", ""]
    return "\n".join(lines)


def card_with_plots(card: str, images: dict[str, bytes]) -> str:
    """The model card with its plots inline: links to ``plots/x.png`` become data URLs,
    and plots the card does not show yet are appended under "Plots"."""
    shown = set()
    for name, png in images.items():
        if f"({name})" in card:
            card = card.replace(f"({name})", f"({_data_url(png)})")
            shown.add(name)
    missing = [n for n in sorted(images) if n not in shown]
    if missing:
        card = card.rstrip() + "\n\n## Plots\n\n" + "\n\n".join(
            f"![{n}]({_data_url(images[n])})" for n in missing) + "\n"
    return card


@task(name="publish-artifacts", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def publish_artifacts(release_url: str) -> dict[str, str]:
    """Publish the release's model card, metrics table and plots as artifacts of this
    flow run; return ``{artifact key: kind}``."""
    logger = get_run_logger()
    release = load_release(release_url)
    manifest = release.manifest
    version = release.version
    images = release_plots(release_url)
    card = _read_text(release_url, MODEL_CARD) or f"# Release {version}\n"
    published: dict[str, str] = {}
    link = redact(release_url)
    key = _key("model-card")
    create_markdown_artifact(card_with_plots(card, images), key=key,
                             description=f"Model card of release {version} ({link})")
    published[key] = "markdown"
    key = _key("metrics")
    create_table_artifact(metrics_rows(manifest), key=key,
                          description=f"Accuracy of release {version}: MAPE % per "
                                      "experiment, their mean (the model card's numbers) "
                                      "and, per candidate family, its validation MAPE %")
    published[key] = "table"
    if images:
        key = _key("plots")
        create_markdown_artifact(plots_markdown(version, link, images), key=key,
                                 description=f"Plots of release {version}")
        published[key] = "markdown"
    logger.info("release %s: published its model card, metrics table and %d plot(s) as "
                "artifacts (%s)", version, len(images), json.dumps(sorted(published)))
    return published


def skipped_gate_markdown(pointer: dict[str, Any]) -> str:
    """A promotion that skipped the golden gate, for the promote flow's artifact."""
    return (f"# Promotion gate: SKIPPED\n\n- release `{pointer['version']}` → "
            f"{pointer['channel']} (was `{pointer.get('previous') or 'unset'}`)\n"
            f"- **gate skipped: {pointer.get('gate_skipped')} by {pointer.get('by')}**\n"
            "- no golden-corpus comparison was made; the skip is recorded in the channel's "
            "history\n")


def release_artifact_ids(version: str) -> dict[str, str]:
    """``{key: artifact id}`` of the artifacts published for release ``version`` (found
    by their description, which names the version)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    keys = [_key("model-card"), _key("metrics"), _key("plots")]
    found: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for artifact in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
                sort=ArtifactSort.CREATED_DESC, limit=50):
            if version in (artifact.description or "") and artifact.key not in found:
                found[str(artifact.key)] = str(artifact.id)
    return found


def candidate_markdown(version: str, channel: str, reason: str,
                       artifacts: dict[str, str]) -> str:
    """What a reviewer opening a recalibration run needs: the new release, links to its
    model card, metrics and plots (published by the calibration subflow) and how to
    promote it."""
    names = {_key("model-card"): "model card", _key("metrics"): "metrics table",
             _key("plots"): "plots"}
    links = ", ".join(f"[{names[k]}](/artifacts/artifact/{i})" for k, i in sorted(
        artifacts.items()) if k in names) or "see the calibrate subflow's artifacts"
    return (f"# Release {version} is the new {channel}\n\n- why: {reason}\n"
            f"- review: {links}\n- promote it: **Deployments → promote/promote → Run → "
            f"Custom run**, `version` = `{version}`, your name as `reviewer`; the golden "
            "gate runs first\n")


@task(name="publish-candidate-note", cache_policy=NO_CACHE)
def publish_candidate_note(version: str, channel: str, reason: str) -> str:
    """A short markdown artifact on the recalibration run linking to the release's
    artifacts; returns its key."""
    key = _key(channel)
    try:
        artifacts = release_artifact_ids(version)
    except Exception as exc:  # links are a convenience: never fail the run for them
        get_run_logger().warning("cannot link the artifacts of %s: %s", version, exc)
        artifacts = {}
    create_markdown_artifact(candidate_markdown(version, channel, reason, artifacts), key=key,
                             description=f"{version} is the new {channel}")
    return key


def _pct(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def gate_markdown(gate: dict[str, Any], verdict: str) -> str:
    """The golden gate's verdict as markdown (for the promote flow's artifact): pooled
    MAPE % per metric, the reasons, and MAPE % per golden experiment and metric."""
    pooled = gate.get("metrics") or {"step": {"n": gate.get("steps"),
                                              "candidate": gate.get("candidate_mape"),
                                              "baseline": gate.get("baseline_mape")}}
    lines = [f"# Promotion gate: {verdict}", "",
             f"- candidate: `{gate['candidate']}`; current: `{gate.get('baseline') or 'none'}`",
             f"- tolerance: {gate['tolerance_pp']:g} percentage point(s); golden corpus "
             f"`{gate.get('corpus') or '?'}`, {gate.get('steps')} steps", ""]
    lines += [f"- **{r}**" for r in gate.get("reasons") or []]
    lines += ["", "| metric | n | candidate MAPE % | current MAPE % |", "|---|---|---|---|"]
    lines += [f"| {m} | {r.get('n')} | {_pct(r.get('candidate'))} | {_pct(r.get('baseline'))} |"
              for m, r in pooled.items()]
    lines += ["", "| experiment | metric | n | candidate MAPE % | current MAPE % |",
              "|---|---|---|---|---|"]
    for name, row in (gate.get("per_experiment") or {}).items():
        metrics = row if isinstance(row.get("step"), dict) else {"step": row}
        for m, r in metrics.items():
            lines.append(f"| {name} | {m} | {r.get('n', r.get('steps'))} | "
                         f"{_pct(r.get('candidate'))} | {_pct(r.get('baseline'))} |")
    return "\n".join(lines) + "\n"


__all__ = ["candidate_markdown", "card_with_plots", "gate_markdown", "metrics_rows",
           "plots_markdown", "publish_artifacts", "publish_candidate_note", "release_plots",
           "skipped_gate_markdown"]
