"""Recalibration: calibrate on a corpus, publish the artifacts, move ``candidate``.

One flow, two deployments (``deploy/deployments.py``): ``nightly`` on a cron schedule,
and ``on-upload``, triggered by the sensor's ``blis.experiment.uploaded`` events
(``flows.watch``). A reviewer then reads the run's artifacts and promotes the candidate
with the ``promote`` deployment.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from blis_model.ingest.uploads import (
    changed_since,
    corpus_identity,
    last_calibrated,
    mark_calibrated,
    scan,
)
from blis_model.models.registry import AUTO_FAMILY
from blis_model.releases.store import list_releases
from blis_model.storage import redact
from blis_model.storage.layout import release_url
from flows.calibrate import calibrate
from tasks.artifacts import publish_candidate_note
from tasks.channels import move_channel, run_actor, run_info


@flow(name="recalibrate")
def recalibrate(corpus: str, store: str, family: str = AUTO_FAMILY,
                ray_address: str | None = None, default_hardware: str | None = None,
                channel: str = "candidate", reason: str = "scheduled recalibration",
                skip_if_unchanged: bool = False) -> str:
    """Calibrate on every experiment under ``corpus``, publish the release to ``store``
    with its artifacts, and point ``channel`` (``candidate``) at it. Returns the URL.
    ``family`` ``auto`` lets validation choose (``flows.calibrate``).

    With ``skip_if_unchanged`` (on-upload runs), a corpus whose objects are exactly those
    of the last calibration on it is not calibrated again: the run returns that release's
    URL (several uploads seen in one scan queue several runs; the first does the work),
    and the reason recorded names every experiment new or changed since that calibration
    (several uploads arriving together are one recalibration)."""
    logger = get_run_logger()
    scanned = scan(corpus)
    identity = corpus_identity(scanned)
    last = last_calibrated(store, corpus)
    if skip_if_unchanged and last.get("identity") == identity:
        logger.info("%s is unchanged since release %s was calibrated on it: nothing to do",
                    redact(corpus), last.get("version"))
        return release_url(store, str(last.get("version")))
    if skip_if_unchanged:
        changed = changed_since(scanned, last)
        if changed:
            logger.info("triggered by: %s", reason)
            reason = f"upload of {', '.join(changed)}"
    logger.info("recalibrating on %s (%s): %s", redact(corpus), family, reason)
    # The calibrate flow publishes the release's artifacts (model card, metrics, plots).
    url = calibrate(corpus=corpus, store=store, family=family, ray_address=ray_address,
                    default_hardware=default_hardware)
    version = url.rstrip("/").rsplit("/", 1)[-1]
    mark_calibrated(store, corpus, identity, version, experiments=scanned)
    move_channel(store, version, channel, by=run_actor(), reason=reason, latest_wins=True,
                 run=run_info())
    publish_candidate_note(version, channel, reason)  # links to the subflow's artifacts
    known = len(list_releases(store))
    logger.info("release %s is the new %s (%d release(s) in the store); promote it with the "
                "'promote' deployment", version, channel, known)
    return url
