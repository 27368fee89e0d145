"""The deployments of the calibration loop, configured from the environment.

* ``recalibrate/nightly`` — cron schedule (``BLIS_NIGHTLY_CRON``, default ``0 2 * * *``
  in ``BLIS_TIMEZONE``, default UTC): calibrate on ``BLIS_CORPUS``, publish the release to
  ``BLIS_STORE`` with its artifacts, move ``candidate``.
* ``watch-uploads/sensor`` — every ``BLIS_WATCH_INTERVAL_S`` seconds (default 60): list
  ``BLIS_WATCH_PREFIX`` (default: the corpus) and emit ``blis.experiment.uploaded`` per
  new experiment.
* ``recalibrate/on-upload`` — no schedule; a deployment trigger on that event runs the
  same recalibration on the prefix named by the event (runs queue: concurrency 1).
* ``promote/promote`` — no schedule; run it from the UI's form with ``version`` and
  ``channel`` (gated on ``BLIS_GOLDEN`` when set).

Optional: ``BLIS_FAMILY`` (default ``auto``: chosen by validation), ``BLIS_RAY_ADDRESS``
(a Ray cluster; default a local Ray per run), ``BLIS_DEFAULT_HARDWARE``,
``BLIS_WATCH_SETTLE_S`` (default 30).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blis_model.errors import ConfigError
from blis_model.models.registry import AUTO_FAMILY
from blis_model.storage import redact

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

UPLOAD_EVENT = "blis.experiment.uploaded"


@dataclass(frozen=True)
class Settings:
    """Where the loop reads traces and writes releases, and when it runs."""

    store: str
    corpus: str
    watch_prefix: str
    golden: str = ""
    family: str = AUTO_FAMILY
    ray_address: str | None = None
    default_hardware: str | None = None
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    watch_interval_s: float = 60.0
    settle_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        store, corpus = env.get("BLIS_STORE", ""), env.get("BLIS_CORPUS", "")
        if not store or not corpus:
            raise ConfigError("set BLIS_STORE (release store URL) and BLIS_CORPUS (trace "
                              "prefix) for the deployments", key="BLIS_STORE/BLIS_CORPUS")
        try:
            interval = float(env.get("BLIS_WATCH_INTERVAL_S", "60"))
            settle = float(env.get("BLIS_WATCH_SETTLE_S", "30"))
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


def build_deployments(s: Settings) -> list[RunnerDeployment]:
    """The four deployments (not yet registered: ``prefect.serve`` or ``.apply()``)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from flows.nightly import recalibrate
    from flows.promote import promote
    from flows.watch import watch_uploads

    common = {"family": s.family, "ray_address": s.ray_address,
              "default_hardware": s.default_hardware, "store": s.store}
    module = EntrypointType.MODULE_PATH
    nightly = recalibrate.to_deployment(
        name="nightly", schedules=[Cron(s.nightly_cron, timezone=s.timezone)],
        parameters={**common, "corpus": s.corpus, "reason": "nightly recalibration"},
        concurrency_limit=1, tags=["blis", "nightly"], entrypoint_type=module,
        description=f"Recalibrate on {s.corpus} every night and move the candidate channel.")
    trigger = DeploymentEventTrigger(
        name="new experiment uploaded", expect={UPLOAD_EVENT},
        match={"prefect.resource.id": "blis.experiment.*",
               "blis.corpus": redact(s.watch_prefix).rstrip("/")},
        parameters={**common, "corpus": "{{ event.resource['blis.corpus'] }}",
                    "reason": "upload of {{ event.resource['blis.experiment'] }}",
                    "skip_if_unchanged": True})
    on_upload = recalibrate.to_deployment(
        name="on-upload", triggers=[trigger], concurrency_limit=1,
        parameters={**common, "corpus": s.watch_prefix, "reason": "upload",
                    "skip_if_unchanged": True},
        tags=["blis", "on-upload"], entrypoint_type=module,
        description=f"Recalibrate when the sensor sees a new experiment under "
                    f"{s.watch_prefix}.")
    sensor = watch_uploads.to_deployment(
        name="sensor", schedules=[Interval(s.watch_interval_s)], concurrency_limit=1,
        parameters={"prefix": s.watch_prefix, "store": s.store, "settle_s": s.settle_s},
        tags=["blis", "sensor"], entrypoint_type=module,
        description=f"List {s.watch_prefix} and emit {UPLOAD_EVENT} per new experiment.")
    gate = {"golden": s.golden} if s.golden else {}
    promoter = promote.to_deployment(
        name="promote", parameters={"store": s.store, "channel": "stable", **gate},
        tags=["blis", "promote"], entrypoint_type=module,
        description="Gate a release on the golden corpus, then move a channel (fill in "
                    "'version' and 'channel').")
    return [nightly, on_upload, sensor, promoter]
