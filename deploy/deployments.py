"""The deployments of the calibration loop, configured from the environment.

* ``recalibrate/nightly`` — cron schedule (``BLIS_NIGHTLY_CRON``, default ``0 2 * * *``
  in ``BLIS_TIMEZONE``, default UTC): calibrate on ``BLIS_CORPUS``, publish the release to
  ``BLIS_STORE`` with its artifacts, move ``candidate``.
* ``watch-uploads/sensor`` — every ``BLIS_WATCH_INTERVAL_S`` seconds (default 20): list
  ``BLIS_WATCH_PREFIX`` (default: the corpus) and emit ``blis.experiment.uploaded`` per
  new experiment whose objects are ``BLIS_WATCH_SETTLE_S`` (default 10) seconds old.
* ``recalibrate/on-upload`` — no schedule; a deployment trigger on that event runs the
  same recalibration on the prefix named by the event (runs queue: concurrency 1).
* ``promote/promote`` — no schedule; run it from the UI's form (``version``, ``reviewer``)
  to move ``stable`` through the golden gate on ``BLIS_GOLDEN``. Without a golden corpus,
  ``stable`` moves only with ``skip_gate`` and a recorded ``skip_gate_reason``.

Optional: ``BLIS_FAMILY`` (default ``auto``: chosen by validation), ``BLIS_RAY_ADDRESS``
(a Ray cluster; default a local Ray per run), ``BLIS_DEFAULT_HARDWARE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blis_model.errors import ConfigError
from blis_model.storage import redact

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

UPLOAD_EVENT = "blis.experiment.uploaded"
AUTO_FAMILY = "auto"  # blis_model.models.registry.AUTO_FAMILY (not imported: it loads them all)
#: Every deployment, as ``<flow>/<deployment>``.
DEPLOYMENTS: tuple[str, ...] = ("recalibrate/nightly", "recalibrate/on-upload",
                                "watch-uploads/sensor", "promote/promote")
WATCH_INTERVAL_S = 20.0
SETTLE_S = 10.0


@dataclass(frozen=True)
class Settings:
    """Where the loop reads traces and writes releases, and when it runs. Latency from an
    upload to its event: at most ``watch_interval_s + settle_s`` (+ the runner's poll)."""

    store: str
    corpus: str
    watch_prefix: str
    golden: str = ""
    family: str = AUTO_FAMILY
    ray_address: str | None = None
    default_hardware: str | None = None
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    watch_interval_s: float = WATCH_INTERVAL_S
    settle_s: float = SETTLE_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        store, corpus = env.get("BLIS_STORE", ""), env.get("BLIS_CORPUS", "")
        if not store or not corpus:
            raise ConfigError("set BLIS_STORE (release store URL) and BLIS_CORPUS (trace "
                              "prefix) for the deployments", key="BLIS_STORE/BLIS_CORPUS")
        try:
            interval = float(env.get("BLIS_WATCH_INTERVAL_S") or WATCH_INTERVAL_S)
            settle = float(env.get("BLIS_WATCH_SETTLE_S") or SETTLE_S)
        except ValueError as exc:
            raise ConfigError(f"not a number ({exc})", key="BLIS_WATCH_*") from None
        return cls(store=store, corpus=corpus,
                   watch_prefix=env.get("BLIS_WATCH_PREFIX") or corpus,
                   golden=env.get("BLIS_GOLDEN", ""),
                   family=env.get("BLIS_FAMILY") or AUTO_FAMILY,
                   ray_address=env.get("BLIS_RAY_ADDRESS") or None,
                   default_hardware=env.get("BLIS_DEFAULT_HARDWARE") or None,
                   nightly_cron=env.get("BLIS_NIGHTLY_CRON") or "0 2 * * *",
                   timezone=env.get("BLIS_TIMEZONE") or "UTC",
                   watch_interval_s=interval, settle_s=settle)


def deployment_parameters(s: Settings) -> dict[str, dict[str, Any]]:
    """The parameters each deployment is registered with (``<flow>/<deployment>`` →
    parameters): what a served stack must show before it is ready."""
    common = {"family": s.family, "ray_address": s.ray_address,
              "default_hardware": s.default_hardware, "store": s.store}
    return {
        "recalibrate/nightly": {**common, "corpus": s.corpus,
                                "reason": "nightly recalibration"},
        "recalibrate/on-upload": {**common, "corpus": s.watch_prefix, "reason": "upload",
                                  "skip_if_unchanged": True},
        "watch-uploads/sensor": {"prefix": s.watch_prefix, "store": s.store,
                                 "settle_s": s.settle_s},
        "promote/promote": {"store": s.store, "channel": "stable", "golden": s.golden},
    }


def build_deployments(s: Settings) -> list[RunnerDeployment]:
    """The four deployments (not yet registered: ``prefect.serve`` or ``.apply()``)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from flows.nightly import recalibrate
    from flows.promote import promote
    from flows.watch import watch_uploads

    params = deployment_parameters(s)
    module = EntrypointType.MODULE_PATH
    nightly = recalibrate.to_deployment(
        name="nightly", schedules=[Cron(s.nightly_cron, timezone=s.timezone)],
        parameters=params["recalibrate/nightly"], concurrency_limit=1,
        tags=["blis", "nightly"], entrypoint_type=module,
        description=f"Recalibrate on {redact(s.corpus)} every night ({s.nightly_cron}, "
                    f"{s.timezone}) and move the candidate channel.")
    on_upload_params = params["recalibrate/on-upload"]
    trigger = DeploymentEventTrigger(
        name="new experiment uploaded", expect={UPLOAD_EVENT},
        match={"prefect.resource.id": "blis.experiment.*",
               "blis.corpus": redact(s.watch_prefix).rstrip("/")},
        parameters={**on_upload_params, "corpus": "{{ event.resource['blis.corpus'] }}",
                    "reason": "upload of {{ event.resource['blis.experiment'] }}"})
    on_upload = recalibrate.to_deployment(
        name="on-upload", triggers=[trigger], concurrency_limit=1,
        parameters=on_upload_params, tags=["blis", "on-upload"], entrypoint_type=module,
        description=f"Recalibrate when the sensor sees new experiments under "
                    f"{redact(s.watch_prefix)}; the run's artifacts (model card, metrics, "
                    "plots) are what a reviewer reads before promoting.")
    sensor = watch_uploads.to_deployment(
        name="sensor", schedules=[Interval(s.watch_interval_s)], concurrency_limit=1,
        parameters=params["watch-uploads/sensor"], tags=["blis", "sensor"],
        entrypoint_type=module,
        description=f"Every {s.watch_interval_s:g} s: list {redact(s.watch_prefix)} and emit "
                    f"{UPLOAD_EVENT} per new experiment (settled for {s.settle_s:g} s).")
    gate = (f"the golden gate on {redact(s.golden)}" if s.golden else
            "NO golden corpus is configured: stable moves only with skip_gate and a reason")
    promoter = promote.to_deployment(
        name="promote", parameters=params["promote/promote"], tags=["blis", "promote"],
        entrypoint_type=module,
        description=f"Move a channel (stable by default) to a release after {gate}. Fill in "
                    "'version' and 'reviewer' (your name, recorded in the history).")
    return [nightly, on_upload, sensor, promoter]
