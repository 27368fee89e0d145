"""Channel tasks: move a channel (with the golden gate), and who is moving it."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from blis_model.calibration.gate import load_gate as golden_gate
from blis_model.configuration.defaults import GATE_TOLERANCE_PP
from blis_model.releases import channels
from blis_model.releases.channels import ChannelConflict, GateRefused, Pointer
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient

CONFLICT_ATTEMPTS = 3


def run_info() -> dict[str, str] | None:
    """The Prefect flow run acting, for a channel's history: ``flow_run_id``,
    ``flow_run_name``, ``flow_name`` and, for a deployment's run, ``deployment_id`` and
    ``deployment_name`` (``<flow>/<deployment>``). None outside a flow run."""
    from prefect.runtime import deployment, flow_run

    try:
        get_run_context()
    except Exception:  # outside a run
        return None
    run_id = flow_run.get_id()
    if not run_id:
        return None
    info = {"flow_run_id": str(run_id), "flow_run_name": str(flow_run.get_name() or ""),
            "flow_name": str(flow_run.get_flow_name() or "")}
    if deployment.get_id():
        info.update(deployment_id=str(deployment.get_id()),
                    deployment_name=f"{info['flow_name']}/{deployment.get_name()}")
    return info


def run_actor() -> str:
    """Who is acting when no person is named: ``prefect flow run <name> (deployment
    <flow>/<deployment>)``, or ``user@host`` outside a flow run."""
    info = run_info()
    if not info or not info["flow_run_name"]:
        return channels.default_actor()
    where = f" (deployment {info['deployment_name']})" if "deployment_name" in info else ""
    return f"prefect flow run {info['flow_run_name']}{where}"


@task(name="load-gate", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def load_gate(corpus: str, tolerance_pp: float = GATE_TOLERANCE_PP
              ) -> channels.Gate:
    """The promotion gate on the golden corpus (featurized once, here)."""
    gate = golden_gate(corpus, tolerance_pp=tolerance_pp)
    get_run_logger().info("golden corpus %s featurized: candidates may not be worse than the "
                          "current release by more than %g percentage point(s)",
                          redact(corpus), tolerance_pp)
    return gate


@task(name="move-channel", task_run_name="move-channel {channel}", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def move_channel(store: str, version: str, channel: str, by: str, reason: str,
                 gate: channels.Gate | None = None, latest_wins: bool = False,
                 skip_gate: str | None = None, run: dict[str, Any] | None = None
                 ) -> Pointer | Any:
    """Point ``channel`` at ``version`` (after ``gate``, when given; ``skip_gate``: the
    recorded reason to move a gated channel without it). ``by`` and ``run`` (the flow
    run acting, :func:`run_info`) are recorded in the pointer and its history.

    A refused gate is an expected outcome: the task completes and returns the gate's
    verdict (``GateResult``, already recorded in the history) instead of a pointer. A
    missing gate (``GateRequired``) fails it, never retried. A concurrent move makes the
    swap fail (``ChannelConflict``, never retried) unless ``latest_wins``: then it is
    re-read and retried, as for ``candidate``, which simply follows the latest
    calibration."""
    logger = get_run_logger()
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            pointer = channels.promote(store, version, channel, by=by, reason=reason,
                                       gate=gate, skip_gate=skip_gate, run=run)
            break
        except GateRefused as exc:
            # An expected outcome, not a crash: the task completes with the verdict (the
            # refusal is already in the channel's history).
            logger.warning("%s", exc)
            return exc.result
        except ChannelConflict as exc:
            if not latest_wins or attempt == CONFLICT_ATTEMPTS:
                raise
            logger.warning("%s; retrying", exc)
    logger.info("channel %s of %s now points to %s (was %s), set by %s", channel,
                redact(store), pointer.version, pointer.previous or "unset", pointer.by)
    return pointer
