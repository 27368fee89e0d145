"""``blis-model``: the command line other tools script against.

Contract: results go to stdout (``fit``/``calibrate`` print the release URL as the LAST
line, ``predict`` the CSV's location); progress bars, tables and warnings go to stderr.
A user error (bad corpus, configuration, store, release) is ONE line ``error: ...`` on
stderr (credentials redacted) and exit code 1; usage errors exit 2. ``s3://`` URLs take
their endpoint and credentials from the environment (``storage.storage_options_for``).

This module is part of the pure library: it never imports Prefect, Ray or the ``flows``
package. ``calibrate`` runs the orchestration layer's flow, found through the
``blis_model.runners`` entry points that package registers (``pyproject.toml``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any

import click
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

from blis_model.configuration.defaults import GATE_TOLERANCE_PP, MAX_REQUEST_FAILURE_RATE
from blis_model.errors import BlisModelError, CorpusError, ReleaseError
from blis_model.releases import channels
from blis_model.releases.channels import Pointer, list_channels
from blis_model.releases.read import Release, load_release, read_manifest
from blis_model.releases.store import list_releases
from blis_model.releases.versions import code_version
from blis_model.storage import (
    StorageError,
    redact,
    storage_options_for,
    write_bytes_atomic,
)

if TYPE_CHECKING:  # the commands import what they need: `releases ...` stays fast
    from blis_model.calibration import featurize as featurization
    from blis_model.configuration.experiment import Experiment
    from blis_model.requests import stage as request_level

PREDICTION_COLUMNS = ("experiment", "step_id", "predicted_us")
#: The model families of ``models.registry.FAMILIES``, named here for --help so that the
#: CLI does not import every family to start (tests/test_cli.py keeps the two equal).
FAMILY_NAMES: tuple[str, ...] = ("bsr_ard", "hfd_tl", "hybrid", "mole_rd", "overlap", "picf",
                                 "rece")
AUTO_FAMILY = "auto"

app = typer.Typer(
    name="blis-model",
    help="Learn BLIS latency coefficients from vLLM traces and publish them as releases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
releases_app = typer.Typer(help="List, inspect, compare and promote releases.",
                           no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(releases_app, name="releases")

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _stdout_console() -> Console:
    """Console for human tables on stdout (wide when not a terminal, so nothing wraps)."""
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() else 240
    return Console(highlight=False, width=None if sys.stdout.isatty() else width)


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

RUNNERS = "blis_model.runners"  # entry-point group the orchestration layer registers


def orchestration_runner(name: str) -> Any:
    """The callable the orchestration layer registered as ``name`` (e.g. ``calibrate``:
    the Prefect flow on Ray). BlisModelError when it is not installed."""
    found = list(entry_points(group=RUNNERS, name=name))
    if not found:
        raise BlisModelError(f"'{name}' needs the orchestration layer (flows/), which is not "
                             "installed with this package")
    try:
        return found[0].load()
    except ImportError as exc:
        raise BlisModelError(f"the {name} flow is not available: {exc}") from None



def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err)


def _featurize_all(experiments: Sequence[Experiment], options: dict[str, Any],
                   settings: request_level.RequestSettings | None = None
                   ) -> list[featurization.Featurized]:
    from blis_model.calibration import featurize as featurization

    items = []
    with _progress() as progress:
        task = progress.add_task("featurize", total=len(experiments))
        for exp in experiments:
            progress.update(task, description=f"featurize {exp.name}")
            items.append(featurization.featurize(exp, options, settings))
            progress.advance(task)
        progress.update(task, description="featurize")
    return items


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
    if value is None:
        return "–"
    if isinstance(value, int) or type(value).__name__.startswith(("int", "uint")):
        return str(int(value))  # Python and numpy integers
    number = float(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else "–"


def _accuracy_table(manifest: dict[str, Any], title: str) -> Table:
    metrics = manifest.get("metrics") or {}
    if metrics.get("request_replay"):
        return _replay_fit_table(metrics["request_replay"], title)
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


def _replay_fit_table(replay: dict[str, Any], title: str) -> Table:
    """A request fit's accuracy: TTFT / ITL / E2E MAPE % per experiment, in-sample and
    leave one experiment out."""
    table = Table(title=title + " — replayed vs measured request latencies (MAPE %)",
                  title_justify="left")
    for col in ("experiment", "requests", "TTFT", "ITL", "E2E", "LOO TTFT", "LOO ITL",
                "LOO E2E", "completed sim / measured"):
        table.add_column(col, justify="left" if col == "experiment" else "right")
    loo = replay.get("leave_one_experiment_out") or {}
    for name, t in sorted((replay.get("in_sample") or {}).items()):
        acc, fold = t["accuracy"], (loo.get(name) or {}).get("accuracy") or {}
        table.add_row(name + (" (overloaded)" if t.get("overloaded") else ""),
                      _fmt(t.get("targets")),
                      *(_fmt(acc[m]["mape"]) for m in ("ttft", "itl", "e2e")),
                      *(_fmt((fold.get(m) or {}).get("mape")) for m in ("ttft", "itl", "e2e")),
                      f"{t.get('completed_simulated')} / {t.get('completed_measured')}")
    s = replay.get("summary") or {}
    table.add_row("mean (not overloaded)", "",
                  *(_fmt(s.get(f"in_sample_{m}_mape")) for m in ("ttft", "itl", "e2e")),
                  *(_fmt(s.get(f"loo_{m}_mape")) for m in ("ttft", "itl", "e2e")), "",
                  style="bold")
    return table


def _replay_table(reports: dict[str, dict[str, Any]], title: str) -> Table:
    """``blis-model replay``'s table: per experiment, TTFT / ITL / E2E MAPE % and the
    simulated vs measured mean, p50, p90, p99 (ms)."""
    table = Table(title=title, title_justify="left")
    for col in ("experiment", "metric", "MAPE %", "mean sim/meas", "p50 sim/meas",
                "p90 sim/meas", "p99 sim/meas", "completed sim/meas"):
        table.add_column(col, justify="left" if col in ("experiment", "metric") else "right")
    for name, r in sorted(reports.items()):
        for m in ("ttft", "itl", "e2e"):
            d = r["distribution_ms"][m]
            table.add_row(name, m.upper(), _fmt(r["accuracy"][m]["mape"]),
                          *(f"{_fmt(d[f'simulated_{k}'], 1)} / {_fmt(d[f'measured_{k}'], 1)}"
                            for k in ("mean", "p50", "p90", "p99")),
                          f"{r['completed_simulated']} / {r['completed_measured']}"
                          if m == "ttft" else "")
    return table


# -------------------------------------------------------------------------- commands


CorpusArg = Annotated[str, typer.Argument(help="Corpus folder or URL (path, file://, s3://).")]
StoreOpt = Annotated[str, typer.Option("--store", help="Release store (path or s3:// URL).")]
FamilyOpt = Annotated[str, typer.Option(
    "--family", help=f"Model family ({', '.join(FAMILY_NAMES)}) or 'auto': the winner of "
    "leave-one-experiment-out validation.")]
HardwareOpt = Annotated[str | None, typer.Option(
    "--default-hardware", help="GPU for experiments whose exp-config.yaml has no 'hardware'.")]
FailureRateOpt = Annotated[float, typer.Option(
    "--max-request-failure-rate", min=0.0, max=1.0,
    help="Stop when more than this share of an experiment's requests fail validation.")]
OverloadOpt = Annotated[bool, typer.Option(
    "--exclude-overloaded/--keep-overloaded",
    help="Leave experiments whose queue keeps growing out of training.")]


@app.command()
def fit(corpus: CorpusArg, store: StoreOpt, family: FamilyOpt = AUTO_FAMILY,
        base: Annotated[str | None, typer.Option(
            "--base", help="Release to calibrate on the corpus instead of fitting afresh.")]
        = None,
        default_hardware: HardwareOpt = None,
        max_request_failure_rate: FailureRateOpt = MAX_REQUEST_FAILURE_RATE,
        exclude_overloaded: OverloadOpt = False) -> None:
    """Fit a model on CORPUS, publish a release to STORE, print the release URL (last line).
    With journey/API traces, the alphas are fit too and request-level accuracy reported."""
    with _user_errors(), _stdout_to_stderr():
        from blis_model.requests import stage as request_level

        settings = request_level.RequestSettings(
            max_request_failure_rate=max_request_failure_rate,
            exclude_overloaded=exclude_overloaded)
        url = _fit(corpus, store, family, base, default_hardware, settings)
    typer.echo(url)


def _fit(corpus: str, store: str, family: str, base: str | None,
         default_hardware: str | None,
         settings: request_level.RequestSettings | None = None) -> str:
    """The calibration recipe in this process (``calibration.recipe.calibrate``), with
    its steps as a status line; then the release's accuracy tables."""
    from blis_model.calibration import recipe

    with err.status("planning") as status:
        url = recipe.calibrate(corpus, store, family=family, base=base,
                               default_hardware=default_hardware, settings=settings,
                               cache=False, progress=lambda step: _step(status, step))
    manifest = read_manifest(url, storage_options_for(url))
    err.print(_accuracy_table(manifest, f"release {manifest['version']} "
                                        f"({manifest['family']})"))
    _print_request_level(manifest)
    return url


def _step(status: Any, step: str) -> None:
    """Show a recipe step on the status line (a line each when stderr is not a terminal:
    logs keep them); decisions (the family) always stay on screen."""
    if step.startswith("family ") or not err.is_terminal:
        err.print(step, markup=False)
    status.update(step)


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
    import numpy as np
    import pandas as pd

    from blis_model.calibration import featurize as featurization
    from blis_model.calibration import recipe
    from blis_model.metrics import per_experiment
    from blis_model.releases.read import predict_frame

    rel = _load_release(release_url)
    corpus_opts = storage_options_for(corpus)
    with err.status("discovering experiments"):
        experiments = featurization.load_experiments(corpus, corpus_opts, default_hardware)
    items = _featurize_all(experiments, corpus_opts)
    for item in items:
        recipe.warn_ingest(item)
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
def calibrate(corpus: CorpusArg, store: StoreOpt, family: FamilyOpt = AUTO_FAMILY,
              ray_address: Annotated[str | None, typer.Option(
                  "--ray-address", help="Ray cluster to join (default: a local Ray).")] = None,
              default_hardware: HardwareOpt = None,
              base: Annotated[str | None, typer.Option(
                  "--base", help="Release to calibrate on the corpus instead of fitting afresh.")]
              = None, max_request_failure_rate: FailureRateOpt = MAX_REQUEST_FAILURE_RATE,
              exclude_overloaded: OverloadOpt = False,
              verbose: Annotated[bool, typer.Option(
                  "--verbose", "-v", help="Print every Prefect and Ray log line (they are "
                                          "always in the Prefect UI).")] = False) -> None:
    """Run the Prefect calibration flow (Ray fan-out); print the release URL (last line).
    Shows progress, the decisions and the accuracy tables; --verbose adds every log."""
    with _user_errors(), _stdout_to_stderr(), _progress_lines(verbose):
        calibrate_flow = orchestration_runner("calibrate")
        extra: dict[str, Any] = {"base": base} if base else {}
        if max_request_failure_rate != MAX_REQUEST_FAILURE_RATE or exclude_overloaded:
            extra.update(max_request_failure_rate=max_request_failure_rate,
                         exclude_overloaded=exclude_overloaded)
        url = calibrate_flow(corpus=corpus, store=store, family=family, ray_address=ray_address,
                             default_hardware=default_hardware, **extra)
        manifest = read_manifest(str(url), storage_options_for(str(url)))
        err.print(_accuracy_table(manifest, f"release {manifest['version']} "
                                            f"({manifest['family']})"))
        _print_request_level(manifest)
    typer.echo(str(url))


QUIET_ENV = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "BLIS_QUIET_WORKERS": "1"}
"""Without --verbose: Prefect's console shows warnings only (its API — the UI — still
gets every line) and Ray workers' logs stay off the terminal."""


@contextlib.contextmanager
def _progress_lines(verbose: bool) -> Iterator[None]:
    """Print the progress logger's lines on stderr; unless ``verbose``, quiet Prefect's
    console and Ray's workers (set before the orchestration layer is imported)."""
    if verbose:
        yield
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    from blis_model.calibration import recipe

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(recipe.PROGRESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)


@app.command()
def upload(folders: Annotated[list[str], typer.Argument(
               help="Experiment folder(s): exp-config.yaml with traces.json[.gz] (and/or "
                    "request measurements).")],
           to: Annotated[str, typer.Option(
               "--to", envvar="BLIS_CORPUS",
               help="Prefix the experiments go under (default $BLIS_CORPUS: the one the "
                    "on-upload sensor watches).")],
           default_hardware: HardwareOpt = None) -> None:
    """Upload experiment folders to the watched prefix (each checked first; its
    exp-config.yaml last, so the sensor never sees half an experiment); print each URL."""
    from blis_model.ingest.uploads import upload_experiment

    urls = []
    with _user_errors(), _stdout_to_stderr():
        options = storage_options_for(to)
        for folder in folders:
            with err.status(f"uploading {folder}"):
                urls.append(upload_experiment(folder, to, options,
                                              default_hardware=default_hardware))
            err.print(f"uploaded {folder} → {redact(urls[-1])}", markup=False)
    for url in urls:
        typer.echo(redact(url))


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


@app.command()
def replay(release: Annotated[str, typer.Argument(help="Release URL (folder with manifest.json).")],
           workload: Annotated[str, typer.Argument(
               help="Folder or URL of request-measurement experiments (requests.json[.gz], "
                    "ground_truth.json[.gz] optional).")],
           out: Annotated[str, typer.Option("--out", help="CSV file to write (path or URL).")],
           blis: Annotated[str | None, typer.Option(
               "--blis", help="Also replay with this BLIS binary and the release's "
                              "defaults.yaml, and print BLIS's table next to ours.")] = None,
           default_hardware: HardwareOpt = None,
           report: Annotated[str | None, typer.Option(
               "--report", help="Also write the per-experiment tables as JSON here.")]
           = None) -> None:
    """Replay every experiment of WORKLOAD through vLLM's scheduler with RELEASE's step
    model and alphas; write one row per request (experiment,index,ttft_us,e2e_us,itl_us,
    queue_us,steps,status) to --out, print the accuracy tables when the experiments have
    ground truth, and print --out (last line)."""
    with _user_errors(), _stdout_to_stderr():
        location = _replay(release, workload, out, blis, default_hardware, report)
    typer.echo(location)


def _replay(release_url: str, workload: str, out: str, blis: str | None,
            default_hardware: str | None, report_url: str | None) -> str:
    import pandas as pd

    from blis_model.calibration.featurize import experiment_names
    from blis_model.requests.measured import load_measured
    from blis_model.requests.replay_release import ROW_COLUMNS, replay_rows, replay_workload

    rel = _load_release(release_url)
    options = storage_options_for(workload)
    with err.status("discovering experiments"):
        names = experiment_names(workload, options)
        items = [load_measured(workload, n, options, default_hardware) for n in names]
    with err.status(f"replaying {len(items)} experiment(s) with release {rel.version}"):
        results = replay_workload(items, rel.model, rel.alphas, rel.contention)
    frames = [pd.DataFrame(replay_rows(item, replayed)) for item, replayed, _ in results]
    data = pd.concat(frames, ignore_index=True).to_csv(index=False, columns=list(ROW_COLUMNS))
    write_bytes_atomic(out, data.encode(), storage_options_for(out))
    reports = {item.name: r for item, _, r in results if r is not None}
    steps = sum(replayed.steps for _, replayed, _ in results)
    seconds = sum(replayed.seconds for _, replayed, _ in results)
    err.print(f"{steps} steps replayed in {seconds:.2f} s ({steps / max(seconds, 1e-9):,.0f} "
              "steps/s)", markup=False)
    if reports:
        err.print(_replay_table(reports, f"release {rel.version} replayed (TTFT / ITL / E2E; "
                                         "ms for the distribution)"))
    if blis:
        from blis_model.releases.blis_binary import run_blis

        blis_reports = run_blis(blis, rel, items, workload)
        if blis_reports:
            err.print(_replay_table(blis_reports, f"BLIS ({blis}) with the release's "
                                                  "defaults.yaml"))
        reports = {"blis-model": reports, "blis": blis_reports}
    if report_url:
        write_bytes_atomic(report_url, (json.dumps(reports, indent=2, default=float) + "\n"
                                        ).encode(), storage_options_for(report_url))
    return out


@releases_app.command("list")
def releases_list(store: Annotated[str, typer.Argument(help="Release store (path or URL).")],
                  as_json: JsonOpt = False) -> None:
    """List the committed releases of STORE, oldest first, and the channels on each."""
    with _user_errors():
        options = storage_options_for(store)
        rows = list_releases(store, options)
        pointers = list_channels(store, options)
    for r in rows:
        r["channels"] = sorted(n for n, p in pointers.items() if p.version == r["version"])
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no releases in {redact(store)}")
        return
    table = Table()
    for col in ("version", "created_at", "family", "experiments", "steps", "temporal MAPE %",
                "LOO MAPE %", "BLIS proj. MAPE %", "url", "channels"):
        table.add_column(col, justify="right" if "MAPE" in col or col in ("experiments", "steps")
                         else "left", no_wrap=True)
    for r in rows:
        table.add_row(str(r["version"]), str(r["created_at"]), str(r["family"]),
                      _fmt(r["experiments"]), _fmt(r["steps"]), _fmt(r["temporal_mape"]),
                      _fmt(r["loo_mape"]), _fmt(r["blis_projection_mape"]), str(r["url"]),
                      ", ".join(r["channels"]))
    console = _stdout_console()
    console.print(table)
    for name, p in sorted(pointers.items()):
        console.print(f"{name} → {p.version} (set {p.updated_at} by {_who(p)}"
                      + (f": {p.reason}" if p.reason else "") + ")", markup=False,
                      soft_wrap=True)


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



StoreArg = Annotated[str, typer.Argument(help="Release store (path or URL).")]
ChannelOpt = Annotated[str, typer.Option("--channel", help="Channel to move (candidate, stable).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the history).")]
ByOpt = Annotated[str | None, typer.Option(
    "--by", help="Who is moving the channel (default: user@host).")]


def _pointer_line(p: Pointer) -> str:
    was = f" (was {p.previous})" if p.previous else ""
    return f"{p.channel} → {p.version}{was}"


def _gate_table(gate: dict[str, Any]) -> Table:
    """The gate's verdict: MAPE % of candidate and baseline per golden experiment and
    metric, then pooled (step only for the step gate; TTFT/ITL/E2E too with journeys)."""
    corpus = gate.get("corpus") or "the golden corpus"
    table = Table(title=f"golden gate on {corpus}: {gate.get('steps')} steps (tolerance "
                        f"{gate['tolerance_pp']:g} pp)", title_justify="left")
    for col in ("experiment", "metric", "n", f"{gate['candidate']} MAPE %",
                f"{gate['baseline'] or 'no baseline'} MAPE %"):
        table.add_column(col, justify="left" if col in ("experiment", "metric") else "right")
    for name, row in (gate.get("per_experiment") or {}).items():
        metrics = row if isinstance(row.get("step"), dict) else {"step": row}
        for metric, r in metrics.items():
            table.add_row(name, metric, _fmt(r.get("n", r.get("steps"))), _fmt(r["candidate"]),
                          _fmt(r["baseline"]))
    pooled = gate.get("metrics") or {"step": {"n": gate.get("steps"),
                                              "candidate": gate.get("candidate_mape"),
                                              "baseline": gate.get("baseline_mape")}}
    for metric, r in pooled.items():
        table.add_row("all", metric, _fmt(r.get("n")), _fmt(r.get("candidate")),
                      _fmt(r.get("baseline")), style="bold")
    return table


@releases_app.command("promote")
def releases_promote(store: StoreArg,
                     version: Annotated[str, typer.Argument(help="Release version to promote.")],
                     channel: ChannelOpt = "stable", reason: ReasonOpt = "", by: ByOpt = None,
                     golden: Annotated[str | None, typer.Option(
                         "--golden", envvar="BLIS_GOLDEN",
                         help="Golden corpus: refuse a release whose MAPE on it is worse than "
                              "the channel's current release's (default $BLIS_GOLDEN).")]
                     = None,
                     no_gate: Annotated[bool, typer.Option(
                         "--no-gate", help="Promote without the golden gate; --reason is "
                                           "then required and recorded as why the gate was "
                                           "skipped.")] = False,
                     tolerance: Annotated[float, typer.Option(
                         "--tolerance", help="Gate tolerance, percentage points of MAPE.")]
                     = GATE_TOLERANCE_PP,
                     default_hardware: HardwareOpt = None, as_json: JsonOpt = False) -> None:
    """Move CHANNEL of STORE to VERSION after the golden gate; print the new pointer.
    stable moves only through the gate (--golden) or with --no-gate --reason "..."."""
    with _user_errors(), _stdout_to_stderr():
        if no_gate and not reason.strip():
            raise ReleaseError("--no-gate needs --reason: why the gate is skipped is recorded "
                               "in the channel's history")
        options = storage_options_for(store)
        gate = None
        if golden and not no_gate:
            from blis_model.calibration.gate import load_gate

            with err.status("featurizing the golden corpus"):
                gate = load_gate(golden, storage_options_for(golden), default_hardware,
                                 tolerance)
        try:
            pointer = channels.promote(store, version, channel, by=by, reason=reason,
                                       gate=gate, skip_gate=reason if no_gate else None,
                                       options=options)
        except channels.GateRequired:
            raise ReleaseError(f"promotion to {channel} needs the golden gate: pass --golden "
                               "CORPUS (or set BLIS_GOLDEN), or skip it with --no-gate "
                               "--reason \"...\" (recorded in the history)") from None
        except channels.GateRefused as exc:
            err.print(_gate_table(exc.result.to_dict()))
            raise
        if pointer.gate:
            err.print(_gate_table(pointer.gate))
    typer.echo(json.dumps(pointer.to_dict(), indent=2) if as_json else _pointer_line(pointer))


@releases_app.command("rollback")
def releases_rollback(store: StoreArg, channel: ChannelOpt = "stable", reason: ReasonOpt = "",
                      by: ByOpt = None, as_json: JsonOpt = False) -> None:
    """Point CHANNEL of STORE back at its previous version; print the new pointer."""
    with _user_errors():
        pointer = channels.rollback(store, channel, by=by, reason=reason,
                                    options=storage_options_for(store))
    typer.echo(json.dumps(pointer.to_dict(), indent=2) if as_json else _pointer_line(pointer))


def _who(e: Pointer) -> str:
    """Who acted, and through which flow run and deployment (when one did)."""
    run = e.run or {}
    if not run.get("flow_run_id"):
        return e.by
    if run.get("flow_run_name") and f"flow run {run['flow_run_name']}" in e.by:
        return f"{e.by} [{run['flow_run_id']}]"  # the run acted by itself (candidate)
    deployment = run.get("deployment_name") or run.get("deployment_id")
    return (f"{e.by} via flow run {run.get('flow_run_name')} [{run['flow_run_id']}]"
            + (f" of deployment {deployment}" if deployment else ""))


def _gate_cell(e: Pointer) -> str:
    """The gate's part in one channel event: passed/refused with the step MAPEs, skipped
    with the reason and who skipped it, or "–" (no gate: a channel without one)."""
    if e.gate_skipped:
        return f"gate skipped: {e.gate_skipped} by {e.by}"
    if not e.gate:
        return "–"
    baseline = e.gate.get("baseline_mape")
    mapes = (f"{_fmt(e.gate.get('candidate_mape'))}% vs {_fmt(baseline)}%" if baseline is not None
             else f"{_fmt(e.gate.get('candidate_mape'))}% (nothing to compare with)")
    if e.action == channels.REFUSED or not e.gate.get("passed", True):
        return f"refused: {mapes}: " + "; ".join(e.gate.get("reasons") or [])
    return f"passed: {mapes}"


@releases_app.command("history")
def releases_history(store: StoreArg, channel: ChannelOpt = "stable",
                     as_json: JsonOpt = False) -> None:
    """Every move of CHANNEL, oldest first, and every promotion the gate refused: when,
    who (and through which flow run), what, the gate, why."""
    with _user_errors():
        events = channels.history(store, channel, storage_options_for(store))
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in events], indent=2))
        return
    table = Table()
    for col in ("seq", "updated_at", "action", "version", "previous", "by", "gate", "reason"):
        table.add_column(col, no_wrap=col not in ("by", "reason", "gate"))
    for e in events:
        table.add_row(str(e.seq), e.updated_at, e.action, e.version, e.previous or "–",
                      _who(e), _gate_cell(e), e.reason)
    _stdout_console().print(table)


@releases_app.command("diff")
def releases_diff(release_a: Annotated[str, typer.Argument(help="Release URL (before).")],
                  release_b: Annotated[str, typer.Argument(help="Release URL (after).")],
                  as_json: JsonOpt = False) -> None:
    """Coefficient and metric changes from RELEASE_A to RELEASE_B."""
    from blis_model.releases.diff import diff_releases

    with _user_errors():
        diff = diff_releases(release_a, release_b, storage_options_for(release_a),
                             storage_options_for(release_b))
    if as_json:
        typer.echo(json.dumps(diff, indent=2))
        return
    console = _stdout_console()
    a, b = diff["a"], diff["b"]
    console.print(f"A {a['version']} ({a['family']}, {a['experiments']} experiments, "
                  f"{a['steps']} steps)\nB {b['version']} ({b['family']}, {b['experiments']} "
                  f"experiments, {b['steps']} steps)", markup=False)
    for key, title in (("metrics", "metric changes (MAPE in %)"),
                       ("coefficients", "coefficient changes")):
        table = Table(title=title, title_justify="left")
        for col in ("name", "A", "B", "change", "change %"):
            table.add_column(col, justify="left" if col == "name" else "right")
        for row in diff[key]:
            table.add_row(row["name"], _fmt(row["a"], 4), _fmt(row["b"], 4),
                          _fmt(row["change"], 4), _fmt(row["change_pct"], 1))
        if not diff[key]:
            table.add_row("(no change)", "", "", "", "")
        console.print(table)


# ------------------------------------------------------- request level, synth and gate


def _print_request_level(manifest: dict[str, Any]) -> None:
    """Alphas and TTFT / ITL / E2E accuracy of a release, on stderr (when it has them)."""
    block = manifest.get("request_level") or {}
    results = ((manifest.get("metrics") or {}).get("request_level")) or {}
    blis = manifest.get("blis") or {}
    alphas = ", ".join(f"{a:.6g}" for a in blis.get("alpha_coeffs", []))
    err.print(f"BLIS alphas {alphas} ({blis.get('alpha_source', '')})", markup=False)
    for name, why in (block.get("excluded") or {}).items():
        err.print(f"excluded from training: {name}: {why}", markup=False)
    if not results:
        return
    table = Table(title="request level (teacher-forced MAPE %)", title_justify="left")
    for col in ("experiment", "requests", "TTFT", "ITL", "E2E", "temporal TTFT",
                "temporal ITL", "temporal E2E"):
        table.add_column(col, justify="left" if col == "experiment" else "right")
    in_sample, temporal = results.get("in_sample") or {}, results.get("temporal_holdout") or {}
    for name in sorted(set(in_sample) | set(temporal)):
        r, t = in_sample.get(name) or {}, temporal.get(name) or {}
        table.add_row(name, _fmt((r.get("ttft") or {}).get("n")),
                      *(_fmt((r.get(m) or {}).get("mape")) for m in ("ttft", "itl", "e2e")),
                      *(_fmt((t.get(m) or {}).get("mape")) for m in ("ttft", "itl", "e2e")))
    s = results.get("summary") or {}
    table.add_row("mean", _fmt(s.get("requests")),
                  *(_fmt(s.get(f"{m}_mape")) for m in ("ttft", "itl", "e2e")),
                  *(_fmt(s.get(f"temporal_{m}_mape")) for m in ("ttft", "itl", "e2e")),
                  style="bold")
    err.print(table)


def _synth_configs(n: int, seed: int, num_requests: int) -> dict[str, Any]:
    """``n`` experiments: the demo corpus's configurations, repeated with other seeds."""
    import dataclasses

    from blis_model.synth import demo_configs

    base = demo_configs(seed=seed, num_requests=num_requests)
    names = list(base)
    out = {}
    for i in range(n):
        name, cfg = names[i % len(names)], base[names[i % len(names)]]
        rep = i // len(names)
        out[name if rep == 0 else f"{name}-r{rep}"] = (
            cfg if rep == 0 else dataclasses.replace(cfg, seed=cfg.seed + 100 * rep))
    return out


@app.command()
def synth(out_dir: Annotated[str, typer.Argument(help="Corpus folder or URL to write.")],
          experiments: Annotated[int, typer.Option(
              "--experiments", min=1, help="Experiments to write (the demo configurations, "
                                            "cycled with new seeds).")] = 3,
          seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
          requests: Annotated[int, typer.Option(
              "--requests", min=1, help="Requests per experiment.")] = 300,
          gzip: Annotated[bool, typer.Option("--gzip/--no-gzip",
                                             help="Write traces.json.gz.")] = True,
          snapshots: Annotated[bool | None, typer.Option(
              "--snapshots/--no-snapshots",
              help="Force REQUEST_SNAPSHOT events on/off (default: per configuration).")]
          = None,
          sample_every: Annotated[int | None, typer.Option(
              "--sample-every", min=1,
              help="Trace 1 step in K (default: per configuration).")] = None,
          client_view: Annotated[bool, typer.Option(
              "--client-view", help="Also write the client view of the same run (request "
                                    "measurements) next to the traces.")] = False,
          client_only: Annotated[bool, typer.Option(
              "--client-only", help="Write the client view (request measurements) without "
                                    "traces.")] = False,
          step_law: Annotated[str, typer.Option(
              "--step-law", help="Step times of the generated runs: 'linear' (each "
                                 "configuration's linear law in tokens and requests) or "
                                 "'physics' (synth.client_view.PHYSICS_LAW over the physics "
                                 "features: what a fit by replay must recover).")]
          = "linear") -> None:
    """Write a synthetic multi-configuration corpus with step, journey and API traces (known
    ground truth) to OUT_DIR, and/or the client view of the same runs (request
    measurements: --client-view, --client-only); print OUT_DIR (last line)."""
    import dataclasses

    from blis_model.synth.client_view import PHYSICS_LAW, physics_step_time, write_synth_corpus

    with _user_errors(), _stdout_to_stderr():
        if step_law not in ("linear", "physics"):
            raise typer.BadParameter(f"--step-law must be 'linear' or 'physics', not "
                                     f"{step_law!r}")
        configs = {}
        for name, cfg in _synth_configs(experiments, seed, requests).items():
            changes: dict[str, Any] = {"gzip": gzip}
            if step_law == "physics":
                changes["step_time_us"] = physics_step_time(PHYSICS_LAW, cfg, seed=cfg.seed)
            if snapshots is not None:
                changes["snapshots"] = snapshots
            if sample_every is not None:
                changes["sample_every"] = sample_every
            configs[name] = dataclasses.replace(cfg, **changes)
        with err.status(f"simulating {len(configs)} experiment(s)"):
            truths = write_synth_corpus(out_dir, configs, traces=not client_only,
                                        client_view=client_view or client_only,
                                        options=storage_options_for(out_dir))
        table = Table(title=f"synthetic corpus {redact(out_dir)}", title_justify="left")
        for col in ("experiment", "model", "mnbt", "requests", "steps", "traced", "snapshots",
                    "client view"):
            table.add_column(col, justify="left" if col in ("experiment", "model") else "right")
        for name, truth in sorted(truths.items()):
            cfg = truth.config
            traced = int(sum(truth.steps.column("traced").to_pylist()))
            table.add_row(name, cfg.model, str(cfg.max_num_batched_tokens),
                          str(cfg.num_requests), str(truth.steps.num_rows),
                          "-" if client_only else str(traced),
                          "-" if client_only else "yes" if cfg.snapshots else "no",
                          "yes" if client_view or client_only else "no")
        err.print(table)
    typer.echo(out_dir)


def _gate_metrics_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"gate: candidate {result['candidate']} vs baseline "
                        f"{result['baseline'] or '(none)'} on {result['corpus']}: "
                        f"{result['steps']} steps, {result['requests']} requests (tolerance "
                        f"{result['tolerance_pp']:g} pp)", title_justify="left")
    for col in ("experiment", "metric", "n", "candidate MAPE %", "baseline MAPE %"):
        table.add_column(col, justify="left" if col in ("experiment", "metric") else "right")
    for name, rows in result["per_experiment"].items():
        for metric, r in rows.items():
            table.add_row(name, metric, _fmt(r["n"]), _fmt(r["candidate"]), _fmt(r["baseline"]))
    for metric, r in result["metrics"].items():
        table.add_row("all", metric, _fmt(r["n"]), _fmt(r["candidate"]), _fmt(r["baseline"]),
                      style="bold")
    return table


@app.command()
def gate(candidate: Annotated[str, typer.Argument(help="Candidate release URL.")],
         golden: Annotated[str, typer.Option("--golden", help="Golden corpus (path or URL).")],
         baseline: Annotated[str | None, typer.Option(
             "--baseline", help="Release to compare against (URL); without it only the "
                                "candidate's own predictions are checked.")] = None,
         tolerance: Annotated[float, typer.Option(
             "--tolerance", min=0.0, help="Allowed MAPE regression, percentage points.")]
         = 1.0,
         default_hardware: HardwareOpt = None, as_json: JsonOpt = False) -> None:
    """Compare CANDIDATE with the baseline on a golden corpus: step MAPE; with journey
    traces, TTFT / ITL / E2E MAPE; with client request measurements, the same latencies
    replayed. Exit 1 with the reasons when the candidate is worse by more than the
    tolerance; print PASS (or --json) otherwise."""
    from blis_model.calibration.gate import compare_releases, load_golden

    with _user_errors(), _stdout_to_stderr():
        cand = _load_release(candidate)
        base = _load_release(baseline) if baseline else None
        with err.status("featurizing the golden corpus"):
            golden_set = load_golden(golden, storage_options_for(golden), default_hardware)
        result = compare_releases(cand, base, golden_set, tolerance)
        err.print(_gate_metrics_table(result.to_dict()))
        if not result.passed:
            raise ReleaseError("gate refused " + cand.version + ": " + "; ".join(result.reasons))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(f"PASS {result.candidate}"
                   + (f" vs {result.baseline}" if result.baseline else "")
                   + f" ({', '.join(result.compared) or 'sanity checks only'})")


def main() -> None:  # pragma: no cover - console entry alias
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
