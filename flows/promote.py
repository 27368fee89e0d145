"""Promotion: gate a release on the golden corpus, then move a channel — from the
Prefect UI's "Run" form of the ``promote`` deployment, or ``blis-model releases promote``.

Outcomes, each a clear final state with a one-line message (no traceback):

* **Completed** — the channel moved; the pointer records the reviewer, this flow run and
  its deployment, and the gate's verdict (or why the gate was skipped);
* **Refused** (a Completed state: a refusal is an expected outcome, not a crash) — the
  golden gate found the release worse; the refusal is recorded in the channel's history
  (who tried, why) and the "promotion gate" artifact shows the numbers;
* **Failed** — the form cannot be acted on (no reviewer; ``stable`` without a golden
  corpus and without ``skip_gate``; ``skip_gate`` without a reason), or the channel was
  moved by someone else meanwhile.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed
from pydantic import Field

from blis_model.configuration.defaults import GATE_TOLERANCE_PP
from blis_model.errors import BlisModelError
from blis_model.releases.channels import GATED_CHANNELS, Pointer, read_channel
from blis_model.storage import StorageError, redact
from flows.runtime import quiet_domain_tracebacks
from tasks.artifacts import gate_markdown, skipped_gate_markdown
from tasks.channels import load_gate, move_channel, run_info

GATE_ARTIFACT = "blis-promotion-gate"
REFUSED = "Refused"


@flow(name="promote", validate_parameters=True)
def promote(version: str,
            reviewer: Annotated[str, Field(min_length=1)],
            channel: str = "stable", reason: str = "",
            skip_gate: bool = False, skip_gate_reason: str = "",
            store: str = "", golden: str = "",
            tolerance_pp: float = GATE_TOLERANCE_PP) -> Any:
    """Move a release channel to a version, after the golden gate.

    Args:
        version: The release to promote, e.g. 20261127T131008Z-25f44d2a (the candidate
            channel's: `blis-model releases list STORE`, or the recalibration run's
            model card).
        reviewer: Your name. Required: recorded in the channel's history as who promoted
            (with this flow run and deployment).
        channel: The channel to move: stable (gated) or candidate.
        reason: Why this release (recorded in the history).
        skip_gate: Promote WITHOUT the golden gate. An override for emergencies: needs
            skip_gate_reason, and the history records "gate skipped: REASON by
            REVIEWER".
        skip_gate_reason: Why the gate is skipped (required with skip_gate).
        store: The release store (set by the deployment).
        golden: The golden corpus both releases are scored on (set by the deployment;
            empty: no gate, so stable can only move with skip_gate).
        tolerance_pp: How many MAPE percentage points worse than the channel's current
            release the candidate may be on the golden corpus.
    """
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        quiet_domain_tracebacks(name)
    logger = get_run_logger()
    reviewer, skip_reason = reviewer.strip(), skip_gate_reason.strip()
    problem = _form_problem(store, reviewer, channel, golden, skip_gate, skip_reason)
    if problem:
        logger.error("%s", problem)
        return Failed(message=problem)
    current = read_channel(store, channel).pointer
    logger.info("%s promotes %s to %s of %s (currently %s)", reviewer, version, channel,
                redact(store), current.version if current else "unset")
    run = run_info()
    if skip_gate:
        pointer = move_channel(store, version, channel, by=reviewer, reason=reason,
                               skip_gate=skip_reason, run=run)
        create_markdown_artifact(skipped_gate_markdown(pointer.to_dict()), key=GATE_ARTIFACT,
                                 description=f"{version} → {channel}: gate skipped")
        logger.warning("gate skipped: %s by %s", skip_reason, reviewer)
        return pointer.to_dict()
    gate = load_gate(golden, tolerance_pp) if golden else None
    try:
        pointer = move_channel(store, version, channel, by=reviewer, reason=reason, gate=gate,
                               run=run)
    except (BlisModelError, StorageError) as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc))
    if not isinstance(pointer, Pointer):  # the gate's verdict: refused
        verdict = pointer.to_dict()
        create_markdown_artifact(gate_markdown(verdict, "REFUSED"), key=GATE_ARTIFACT,
                                 description=f"{version} → {channel}: refused")
        message = (f"{version} not promoted to {channel}: refused by the golden gate: "
                   + "; ".join(verdict.get("reasons") or []))
        logger.warning("%s (recorded in the history of %s)", message, channel)
        return Completed(name=REFUSED, message=message, data={"refused": True, **verdict})
    if pointer.gate:
        create_markdown_artifact(gate_markdown(pointer.gate, "passed"), key=GATE_ARTIFACT,
                                 description=f"{version} → {channel}: passed")
    return pointer.to_dict()


def _form_problem(store: str, reviewer: str, channel: str, golden: str, skip_gate: bool,
                  skip_reason: str) -> str | None:
    """Why the form cannot be acted on (None when it can)."""
    if not store:
        return "promote needs the release store (parameter 'store')"
    if not reviewer:
        return "fill in 'reviewer' (your name): it is recorded as who promoted"
    if skip_gate and not skip_reason:
        return "skip_gate needs skip_gate_reason: why the gate is skipped is recorded"
    if channel in GATED_CHANNELS and not golden and not skip_gate:
        return (f"promotion to {channel} needs the golden gate, and no golden corpus is "
                "configured (parameter 'golden', BLIS_GOLDEN): configure one, or tick "
                "skip_gate and give skip_gate_reason (recorded in the history)")
    return None
