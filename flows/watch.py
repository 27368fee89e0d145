"""The on-upload sensor: list a watched prefix, emit one Prefect event per new (or
changed) experiment, remember what was seen in ``<store>/state/seen.json``.

Event ``blis.experiment.uploaded``; resource ``blis.experiment.<prefix>/<name>`` with
labels ``blis.corpus`` (the watched prefix), ``blis.experiment`` and ``blis.store``. The
``on-upload`` deployment's trigger turns each event into a ``recalibrate`` run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Completed

from blis_model.ingest.uploads import load_seen, new_experiments, save_seen, scan
from blis_model.storage import redact
from flows.runtime import quiet_domain_tracebacks

EVENT = "blis.experiment.uploaded"


@flow(name="watch-uploads")
def watch_uploads(prefix: str, store: str, settle_s: float = 10.0) -> list[str]:
    """Scan ``prefix`` once; emit an event per experiment that is new or changed and has
    not changed for ``settle_s`` seconds (a folder still uploading waits). Returns the
    names of the experiments reported; the run's final message says how many there are.
    An empty or not yet created prefix holds 0 experiments (a Completed run); a missing
    bucket or bad credentials fail the run with one line."""
    quiet_domain_tracebacks()
    logger = get_run_logger()
    scanned = scan(prefix)
    seen = load_seen(store, prefix)
    ready, waiting = new_experiments(scanned, seen, settle_s)
    corpus = redact(prefix).rstrip("/")
    for item in ready:
        emit_event(event=EVENT,
                   resource={"prefect.resource.id": f"blis.experiment.{corpus}/{item.name}",
                             "prefect.resource.name": item.name, "blis.corpus": corpus,
                             "blis.experiment": item.name, "blis.store": redact(store)},
                   payload={"identity": item.identity, "files": item.files,
                            "bytes": item.bytes})
        logger.info("new experiment %s under %s (%d objects, %.1f MB): event emitted",
                    item.name, corpus, item.files, item.bytes / 1e6)
    for item in waiting:
        logger.info("experiment %s is still changing (newest object < %.0f s old): next scan",
                    item.name, settle_s)
    if ready:
        # Remember only what was reported: a waiting experiment stays new.
        remembered = {name: s for name, s in scanned.items()
                      if name in {r.name for r in ready} or seen.get(name) == s.identity}
        save_seen(store, prefix, remembered)
    message = (f"{len(scanned)} experiment(s) under {corpus}: {len(ready)} new, "
               f"{len(waiting)} still uploading")
    if not scanned:
        message = f"0 experiments under {corpus} (empty, or nothing uploaded yet)"
    logger.info("%s", message)
    return Completed(message=message, data=[r.name for r in ready])
