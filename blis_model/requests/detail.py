"""Per-request detail DERIVED from one replay's log (``replay(..., detail=True)``): who was
in every step's batch, as vLLM's ``REQUEST_SNAPSHOT`` events describe it, and what each
stay in the running batch looked like. Nothing here schedules.

A stay (admission → preemption, abort or finish) first (re)computes its known tokens in
chunks (the log's chunks), then, from the step after the chunk that completed them,
decodes one token per step at context ``tokens computed`` until it ends.

Vectorized over stays and chunks (numpy), so deriving detail costs a few array passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from blis_model.ingest.steps import composition_of_members
from blis_model.requests.scheduler import EngineLog
from blis_model.requests.workload import Workload

MEMBER_SCHEMA = pa.schema([
    pa.field("step_id", pa.int64()), pa.field("request", pa.int64()),
    pa.field("prefill", pa.bool_()), pa.field("prompt", pa.int64()),
    pa.field("computed", pa.int64()), pa.field("output", pa.int64()),
    pa.field("scheduled", pa.int64()), pa.field("preemptions", pa.int64()),
    pa.field("blocks_allocated", pa.int64()), pa.field("blocks_cached", pa.int64()),
])
"""One row per (step, request in its batch), like a REQUEST_SNAPSHOT: ``prefill``
(phase), full prompt length, tokens computed before the step, outputs before the step,
tokens scheduled, preemptions so far, KV blocks held after the step's allocation, blocks
served by the prefix cache. Sorted by step, then decodes before prefills, then request."""


def stay_table(log: EngineLog, workload: Workload) -> dict[str, np.ndarray]:
    """Every stay, with where its (re)computation completed: ``request``, ``start`` (first
    step), ``last`` (last step in the batch), ``end`` (how it ended, ``scheduler.STAY_*``),
    ``end_step``, ``hit`` (tokens from the prefix cache), ``output``/``preemptions`` at
    its start, ``complete`` (step whose chunk completed the known tokens, -1: none) and
    ``output_end`` (outputs when it ended)."""
    return _stays_and_chunks(log, workload)[0]


def _stays_and_chunks(log: EngineLog, workload: Workload
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(stays, chunks, the stay of each chunk)."""
    stays = {name: np.asarray(getattr(log, f"stay_{name}"), np.int64) for name in (
        "req", "start", "hit", "output", "preemptions", "last", "end", "end_step")}
    stays["request"] = stays.pop("req")
    chunk = {name: np.asarray(getattr(log, f"chunk_{name}"), np.int64)
             for name in ("step", "req", "tokens", "computed")}
    # a chunk belongs to the latest stay of its request that started at or before it
    span = int(max(np.max(stays["end_step"], initial=0), np.max(chunk["step"], initial=0))) + 2
    stay_key = stays["request"] * span + stays["start"]
    order = np.argsort(stay_key, kind="stable")
    idx = order[np.searchsorted(stay_key[order], chunk["req"] * span + chunk["step"],
                                "right") - 1]
    known = workload.prompt_tokens[chunk["req"]] + stays["output"][idx]
    completes = chunk["computed"] + chunk["tokens"] == known
    complete = np.full(len(stays["request"]), -1, np.int64)
    complete[idx[completes]] = chunk["step"][completes]
    decoded = np.where(complete >= 0, np.maximum(stays["last"] - complete, 0), 0)
    stays["complete"] = complete
    stays["output_end"] = stays["output"] + (complete >= 0) + decoded
    return stays, chunk, idx


def step_members(log: EngineLog, workload: Workload, block_size: int) -> pa.Table:
    """The batch of every step, one row per member (MEMBER_SCHEMA)."""
    stays, chunk, idx = _stays_and_chunks(log, workload)
    prompt = workload.prompt_tokens
    # chunks: the stay's outputs are fixed until its computation completes
    c_req, c_t, c_c = chunk["req"], chunk["tokens"], chunk["computed"]
    c_out = stays["output"][idx]
    c_known = prompt[c_req] + c_out
    c_prefill = ~((c_t == 1) & (c_out >= 1) & (c_c + 1 == c_known))  # else a decode
    # decodes: from the step after completion to the stay's last step
    first = stays["complete"] + 1
    n_dec = np.where(stays["complete"] >= 0, stays["last"] - stays["complete"], 0)
    n_dec = np.maximum(n_dec, 0)
    which = np.repeat(np.arange(len(n_dec)), n_dec)
    offset = np.arange(len(which)) - np.repeat(np.cumsum(n_dec) - n_dec, n_dec)
    d_step = first[which] + offset
    d_req = stays["request"][which]
    d_ctx = prompt[d_req] + stays["output"][which] + offset
    d_out = stays["output"][which] + 1 + offset
    cols = {
        "step_id": np.concatenate([chunk["step"], d_step]),
        "request": np.concatenate([c_req, d_req]),
        "prefill": np.concatenate([c_prefill, np.zeros(len(which), bool)]),
        "computed": np.concatenate([c_c, d_ctx]),
        "output": np.concatenate([c_out, d_out]),
        "scheduled": np.concatenate([c_t, np.ones(len(which), np.int64)]),
        "preemptions": np.concatenate([stays["preemptions"][idx],
                                       stays["preemptions"][which]]),
        "blocks_cached": np.concatenate([stays["hit"][idx], stays["hit"][which]])
        // block_size,
    }
    cols["prompt"] = prompt[cols["request"]]
    cols["blocks_allocated"] = -(-(cols["computed"] + cols["scheduled"]) // block_size)
    order = np.lexsort((cols["request"], cols["prefill"], cols["step_id"]))
    return pa.table({name: pa.array(cols[name][order], field.type)
                     for name, field in zip(MEMBER_SCHEMA.names, MEMBER_SCHEMA, strict=True)},
                    schema=MEMBER_SCHEMA)


def member_aggregates(members: pa.Table, n_steps: int) -> dict[str, np.ndarray]:
    """Per-step composition columns (``ingest.steps.COMPOSITION_COLUMNS``) summed from the
    members (``ingest.steps.composition_of_members``: the step table's formulas)."""
    step = members.column("step_id").to_numpy()
    col = {name: members.column(name).to_numpy().astype(np.float64)
           for name in ("prompt", "computed", "scheduled", "preemptions", "blocks_allocated",
                        "blocks_cached")}
    pf = np.asarray(members.column("prefill").to_numpy(zero_copy_only=False), bool)
    return composition_of_members(step, n_steps, pf, col)
