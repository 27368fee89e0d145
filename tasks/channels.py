"""Channel tasks: move a channel (with the golden gate), and who is moving it."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from blis_model.calibration.gate import load_gate as golden_gate
from blis_model.configuration.defaults import GATE_TOLERANCE_PP
from blis_model.releases import channels
from blis_model.releases.channels import ChannelConflict, Pointer
from blis_model.storage import redact
from tasks.policy import RETRIES, RETRY_DELAYS, transient

CONFLICT_ATTEMPTS = 3


def run_actor() -> str:
    """Who is acting, in Prefect's terms: ``prefect flow run <name> (deployment
    <flow>/<deployment>)``, or ``user@host`` outside a flow run."""
    from prefect.runtime import deployment, flow_run

    try:
        get_run_context()
    except Exception:  # outside a run
        return channels.default_actor()
    name = flow_run.get_name()
    if not name:
        return channels.default_actor()
    where = (f" (deployment {flow_run.get_flow_name()}/{deployment.get_name()})"
             if deployment.get_id() else "")
    return f"prefect flow run {name}{where}"


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
                 gate: channels.Gate | None = None, latest_wins: bool = False) -> Pointer:
    """Point ``channel`` at ``version`` (after ``gate``, when given).

    A concurrent move makes the swap fail (``ChannelConflict``, never retried) unless
    ``latest_wins``: then it is re-read and retried, as for ``candidate``, which simply
    follows the latest calibration."""
    logger = get_run_logger()
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            pointer = channels.promote(store, version, channel, by=by, reason=reason,
                                       gate=gate)
            break
        except ChannelConflict as exc:
            if not latest_wins or attempt == CONFLICT_ATTEMPTS:
                raise
            logger.warning("%s; retrying", exc)
    logger.info("channel %s of %s now points to %s (was %s), set by %s", channel,
                redact(store), pointer.version, pointer.previous or "unset", pointer.by)
    return pointer
