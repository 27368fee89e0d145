"""``blis-model``: the command line other tools script against.

Contract: results go to stdout (``fit``/``calibrate`` print the release URL as the LAST
line, ``predict`` the CSV's location); progress bars, tables and warnings go to stderr.
A user error (bad corpus, configuration, store, release) is ONE line ``error: ...`` on
stderr (credentials redacted) and exit code 1; usage errors exit 2. ``s3://`` URLs take
their endpoint and credentials from the environment (``storage.storage_options_for``).

This module must not import Prefect or Ray at import time: ``calibrate`` imports the
flow inside the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import click
import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from blis_model import pipeline
from blis_model.errors import BlisModelError, CorpusError, ReleaseError
from blis_model.experiment import Experiment
from blis_model.metrics import per_experiment
from blis_model.models.registry import DEFAULT_FAMILY, FAMILIES, make_model
from blis_model.release import (
    Release,
    build_release,
    code_version,
    load_release,
    predict_frame,
    read_manifest,
    release_version,
)
from blis_model.release_store import list_releases, publish
from blis_model.storage import (
    StorageError,
    check_reachable,
    redact,
    storage_options_for,
    write_bytes_atomic,
)

PREDICTION_COLUMNS = ("experiment", "step_id", "predicted_us")

app = typer.Typer(
    name="blis-model",
    help="Learn BLIS latency coefficients from vLLM traces and publish them as releases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
releases_app = typer.Typer(help="List and inspect published releases.", no_args_is_help=True,
                           pretty_exceptions_enable=False)
app.add_typer(releases_app, name="releases")

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _stdout_console() -> Console:
    """Console for human tables on stdout (wide when not a terminal, so nothing wraps)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


# ---------------------------------------------------------------------------- errors


def _fail(message: str, code: int = 1) -> None:
    line = " ".join(redact(str(message)).split()) or "failed"
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every expected failure into one redacted stderr line and exit code 1."""
    try:
        yield
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (BlisModelError, StorageError, ValueError, OSError) as exc:
        _fail(str(exc) or type(exc).__name__)
    except Exception as exc:
        if os.environ.get("BLIS_MODEL_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set BLIS_MODEL_DEBUG=1 for a traceback)")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for results: anything printed while working goes to stderr."""
    sys.stdout.flush()
    with contextlib.redirect_stdout(sys.stderr):
        yield
    sys.stderr.flush()


class _WarningHandler(logging.StreamHandler):
    """Library warnings and errors as ``warning: ...`` lines on stderr (redacted)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {redact(record.getMessage())}"

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # follow redirections (tests, CliRunner)
        super().emit(record)


def _version_callback(value: bool) -> None:
    if value:
        info = code_version()
        typer.echo(f"blis-model {info['version']}"
                   + (f" ({info['git_commit'][:12]})" if info["git_commit"] else ""))
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                                is_eager=True, help="Show the version.")]
          = False) -> None:
    """Learn BLIS latency coefficients from vLLM traces and publish them as releases."""
    root = logging.getLogger()
    if not any(isinstance(h, _WarningHandler) for h in root.handlers):
        root.addHandler(_WarningHandler())


# --------------------------------------------------------------------------- helpers


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err)


def _featurize_all(experiments: Sequence[Experiment], options: dict[str, Any]
                   ) -> list[pipeline.Featurized]:
    items = []
    with _progress() as progress:
        task = progress.add_task("featurize", total=len(experiments))
        for exp in experiments:
            progress.update(task, description=f"featurize {exp.name}")
            items.append(pipeline.featurize(exp, options))
            progress.advance(task)
        progress.update(task, description="featurize")
    return items


def _warn_ingest(items: Sequence[pipeline.Featurized]) -> None:
    for item in items:
        r = item.report
        dropped = int(r.counts.get("steps_bad_duration", 0))
        if r.problems:
            first = redact(str(r.problems[0]))
            extra = len(r.problems) - 1
            more = f" (+{extra} more, see the manifest)" if extra else ""
            err.print(f"warning: {item.experiment.name}: {len(r.problems)} unreadable part(s) "
                      f"skipped: {first}{more}", markup=False)
        if dropped:
            err.print(f"warning: {item.experiment.name}: {dropped} step(s) with missing or "
                      "non-positive duration excluded", markup=False)


def _load_release(url: str) -> Release:
    """Load a release; a store URL given instead gets a hint."""
    options = storage_options_for(url)
    try:
        return load_release(url, options)
    except ReleaseError:
        try:
            is_store = bool(list_releases(url, options))
        except (BlisModelError, StorageError, OSError):
            is_store = False
        if is_store:
            raise ReleaseError(f"{url} is a release store, not a release: pick one from "
                               f"`blis-model releases list {url}`") from None
        raise


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _accuracy_table(manifest: dict[str, Any], title: str) -> Table:
    metrics = manifest.get("metrics") or {}
    proj = ((metrics.get("blis_projection") or {}).get("per_experiment")) or {}
    table = Table(title=title, title_justify="left")
    for col in ("experiment", "steps", "in-sample MAPE %", "temporal MAPE %", "LOO MAPE %",
                "BLIS projection MAPE %"):
        table.add_column(col, justify="left" if col == "experiment" else "right")
    for exp in manifest.get("experiments", []):
        name = exp["name"]
        row = [(metrics.get(k) or {}).get(name, {}).get("mape")
               for k in ("in_sample", "temporal_holdout", "leave_one_experiment_out")]
        table.add_row(name, _fmt(exp.get("steps")), *(_fmt(v) for v in row),
                      _fmt((proj.get(name) or {}).get("projection", {}).get("mape")))
    s = metrics.get("summary") or {}
    ps = ((metrics.get("blis_projection") or {}).get("summary")) or {}
    table.add_row("mean", _fmt(s.get("steps")), _fmt(s.get("in_sample_mape")),
                  _fmt(s.get("temporal_mape")), _fmt(s.get("loo_mape")),
                  _fmt(ps.get("projection_mape")), style="bold")
    return table


# -------------------------------------------------------------------------- commands


CorpusArg = Annotated[str, typer.Argument(help="Corpus folder or URL (path, file://, s3://).")]
StoreOpt = Annotated[str, typer.Option("--store", help="Release store (path or s3:// URL).")]
FamilyOpt = Annotated[str, typer.Option(
    "--family", help=f"Model family ({', '.join(sorted(FAMILIES))}).")]
HardwareOpt = Annotated[str | None, typer.Option(
    "--default-hardware", help="GPU for experiments whose exp-config.yaml has no 'hardware'.")]


@app.command()
def fit(corpus: CorpusArg, store: StoreOpt, family: FamilyOpt = DEFAULT_FAMILY,
        base: Annotated[str | None, typer.Option(
            "--base", help="Release to calibrate on the corpus instead of fitting afresh.")]
        = None,
        default_hardware: HardwareOpt = None) -> None:
    """Fit a model on CORPUS, publish a release to STORE, print the release URL (last line)."""
    with _user_errors(), _stdout_to_stderr():
        url = _fit(corpus, store, family, base, default_hardware)
    typer.echo(url)


def _fit(corpus: str, store: str, family: str, base: str | None,
         default_hardware: str | None) -> str:
    corpus_opts, store_opts = storage_options_for(corpus), storage_options_for(store)
    base_release: Release | None = None
    if base:
        base_release = _load_release(base)
        family = base_release.family
        err.print(f"calibrating release {base_release.version} ({family})", markup=False)
    else:
        make_model(family)  # unknown family: ValueError naming the known ones
    check_reachable(store, store_opts)
    with err.status("discovering experiments"):
        experiments = pipeline.load_experiments(corpus, corpus_opts, default_hardware)
    err.print(f"{len(experiments)} experiment(s) under {redact(corpus)}", markup=False)
    items = _featurize_all(experiments, corpus_opts)
    _warn_ingest(items)
    frame = pipeline.training_frame(items)
    with err.status(f"fitting {family} on {len(frame)} steps"):
        model = pipeline.fit_model(frame, family,
                                   base=base_release.model if base_release else None)
    with err.status("evaluating (in-sample, temporal holdout, leave-one-out)"):
        evaluation = pipeline.evaluate(frame, model, family)
    with err.status("building and publishing the release"):
        files = build_release(model, frame, experiments, [i.report for i in items], corpus,
                              evaluation, family,
                              base_version=base_release.version if base_release else None,
                              options=corpus_opts)
        url = publish(files, store, release_version(files), store_opts)
    manifest = json.loads(files["manifest.json"])
    err.print(_accuracy_table(manifest, f"release {manifest['version']} ({family})"))
    return url


@app.command()
def predict(release: Annotated[str, typer.Argument(
                help="Release URL (folder with manifest.json).")],
            corpus: CorpusArg,
            out: Annotated[str, typer.Option("--out", help="CSV file to write (path or URL).")],
            default_hardware: HardwareOpt = None) -> None:
    """Predict every traced step of CORPUS with RELEASE; write experiment,step_id,predicted_us."""
    with _user_errors(), _stdout_to_stderr():
        location = _predict(release, corpus, out, default_hardware)
    typer.echo(location)


def _predict(release_url: str, corpus: str, out: str, default_hardware: str | None) -> str:
    rel = _load_release(release_url)
    corpus_opts = storage_options_for(corpus)
    with err.status("discovering experiments"):
        experiments = pipeline.load_experiments(corpus, corpus_opts, default_hardware)
    items = _featurize_all(experiments, corpus_opts)
    _warn_ingest(items)
    frames = [i.frame for i in items if len(i.frame)]
    if not frames:
        raise CorpusError(f"no usable steps under {corpus}: nothing to predict")
    frame = pd.concat(frames, ignore_index=True)
    predicted = predict_frame(rel, frame)
    result = pd.DataFrame({"experiment": frame["experiment"].astype(str),
                           "step_id": frame["step_id"].astype(np.int64),
                           "predicted_us": predicted})
    result = result.sort_values(["experiment", "step_id"], kind="stable").reset_index(drop=True)
    data = result.to_csv(index=False, columns=list(PREDICTION_COLUMNS)).encode()
    write_bytes_atomic(out, data, storage_options_for(out))
    known = rel.config_keys | set((rel.coefficients.get("model") or {}).get("per_config") or {})
    table = Table(title=f"predictions of release {rel.version}", title_justify="left")
    for col in ("experiment", "steps", "coefficients", "MAPE vs measured %"):
        table.add_column(col, justify="left" if col in ("experiment", "coefficients")
                         else "right")
    scores = per_experiment(frame, predicted)
    keys = dict(zip(frame["experiment"], frame["config_key"], strict=False))
    for name in sorted(scores):
        table.add_row(name, _fmt(scores[name]["n"]),
                      "calibrated" if keys.get(name) in known else "global (zero-shot)",
                      _fmt(scores[name]["mape"]))
    err.print(table)
    return out


@app.command()
def calibrate(corpus: CorpusArg, store: StoreOpt, family: FamilyOpt = DEFAULT_FAMILY,
              ray_address: Annotated[str | None, typer.Option(
                  "--ray-address", help="Ray cluster to join (default: a local Ray).")] = None,
              default_hardware: HardwareOpt = None,
              base: Annotated[str | None, typer.Option(
                  "--base", help="Release to calibrate on the corpus instead of fitting afresh.")]
              = None) -> None:
    """Run the Prefect calibration flow (Ray fan-out); print the release URL (last line)."""
    with _user_errors(), _stdout_to_stderr():
        try:
            from flows.calibrate import run_calibration as calibrate_flow
        except ImportError as exc:
            raise BlisModelError(f"the calibrate flow is not available: {exc}") from None
        extra = {"base": base} if base else {}
        url = calibrate_flow(corpus=corpus, store=store, family=family, ray_address=ray_address,
                             default_hardware=default_hardware, **extra)
        manifest = read_manifest(str(url), storage_options_for(str(url)))
        err.print(_accuracy_table(manifest, f"release {manifest['version']} ({family})"))
    typer.echo(str(url))


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


@releases_app.command("list")
def releases_list(store: Annotated[str, typer.Argument(help="Release store (path or URL).")],
                  as_json: JsonOpt = False) -> None:
    """List the committed releases of STORE, oldest first."""
    with _user_errors():
        rows = list_releases(store, storage_options_for(store))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print(f"no releases in {redact(store)}", markup=False)
        return
    table = Table()
    for col in ("version", "created_at", "family", "experiments", "steps", "temporal MAPE %",
                "LOO MAPE %", "BLIS proj. MAPE %", "url"):
        table.add_column(col, justify="right" if "MAPE" in col or col in ("experiments", "steps")
                         else "left", no_wrap=True)
    for r in rows:
        table.add_row(str(r["version"]), str(r["created_at"]), str(r["family"]),
                      _fmt(r["experiments"]), _fmt(r["steps"]), _fmt(r["temporal_mape"]),
                      _fmt(r["loo_mape"]), _fmt(r["blis_projection_mape"]), str(r["url"]))
    _stdout_console().print(table)


@releases_app.command("show")
def releases_show(release: Annotated[str, typer.Argument(help="Release URL.")],
                  as_json: JsonOpt = False) -> None:
    """Show a release: provenance, accuracy per experiment, BLIS coefficients."""
    with _user_errors():
        manifest = read_manifest(release, storage_options_for(release))
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    console = _stdout_console()
    corpus = manifest.get("corpus") or {}
    code = manifest.get("code") or {}
    blis = manifest.get("blis") or {}
    lines = [
        f"release     {manifest.get('version')}",
        f"url         {redact(release)}",
        f"created     {manifest.get('created_at')}",
        f"family      {manifest.get('family')}"
        + (f" (calibrated from {manifest['base_version']})" if manifest.get("base_version")
           else ""),
        f"corpus      {corpus.get('url')} ({corpus.get('experiments')} experiments, "
        f"{corpus.get('steps')} steps)",
        f"fingerprint {corpus.get('fingerprint')}",
        f"code        blis-model {code.get('version')} {code.get('git_commit') or ''}".rstrip(),
        f"BLIS betas  {', '.join(f'{b:.6g}' for b in blis.get('beta_coeffs', []))}",
        f"BLIS alphas {', '.join(f'{a:.6g}' for a in blis.get('alpha_coeffs', []))}"
        + ("" if blis.get("alphas_fit") else " (BLIS defaults, not fit)"),
    ]
    for line in lines:
        console.print(line, markup=False)
    console.print(_accuracy_table(manifest, "accuracy"))


def main() -> None:  # pragma: no cover - console entry alias
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
