"""Promotion: gate a release on the golden corpus, then move a channel — from the
Prefect UI's "Run" form of the ``promote`` deployment, or ``blis-model releases promote``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blis_model.configuration.defaults import GATE_TOLERANCE_PP
from blis_model.releases.channels import GateRefused, read_channel
from blis_model.storage import redact
from tasks.artifacts import gate_markdown
from tasks.channels import load_gate, move_channel, run_actor


@flow(name="promote")
def promote(version: str, channel: str = "stable", store: str = "", golden: str = "",
            reason: str = "", promoted_by: str = "",
            tolerance_pp: float = GATE_TOLERANCE_PP) -> dict:
    """Point ``channel`` of ``store`` at release ``version``. When ``golden`` (a corpus)
    is set, refuse a release whose step MAPE on it is worse than the channel's current
    release's by more than ``tolerance_pp`` points. Returns the new pointer."""
    logger = get_run_logger()
    if not store:
        raise ValueError("promote needs the release store (parameter 'store')")
    current = read_channel(store, channel).pointer
    logger.info("promoting %s to %s of %s (currently %s)", version, channel, redact(store),
                current.version if current else "unset")
    gate = load_gate(golden, tolerance_pp) if golden else None
    by = promoted_by or run_actor()
    try:
        pointer = move_channel(store, version, channel, by=by, reason=reason, gate=gate)
    except GateRefused as exc:
        create_markdown_artifact(gate_markdown(exc.result.to_dict(), "REFUSED"),
                                 key="blis-promotion-gate",
                                 description=f"{version} → {channel}: refused")
        raise
    if pointer.gate:
        create_markdown_artifact(gate_markdown(pointer.gate, "passed"),
                                 key="blis-promotion-gate",
                                 description=f"{version} → {channel}: passed")
    return pointer.to_dict()
