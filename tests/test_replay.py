"""The replay engine: vLLM V1's scheduler on small hand-checked workloads, its invariants on
random ones, and agreement with a plain request-by-request implementation of the same
policy (which the fast engine must equal step for step)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import yaml

from blis_model.configuration.experiment import load_experiment
from blis_model.errors import ConfigError
from blis_model.features.frame import feature_frame
from blis_model.ingest.steps import COMPOSITION_COLUMNS, STEP_SCHEMA, SUMMARY_FIELDS
from blis_model.requests.detail import member_aggregates, stay_table, step_members
from blis_model.requests.kv import KVPool
from blis_model.requests.replay import (
    ServerLimits,
    StepAggregates,
    Workload,
    blis_latencies,
    replay,
)
from blis_model.requests.scheduler import AGGREGATES, STAY_PREEMPTED, prefix_blocks, rejections

STEP_US = 1000.0


def server(budget: int = 2048, seqs: int = 8, block_size: int = 16, blocks: int = 10_000,
           **kwargs) -> ServerLimits:
    """A server with room to spare unless told otherwise."""
    return ServerLimits(budget, seqs, block_size, blocks, **kwargs)


def constant(agg: StepAggregates) -> float:
    """Every step takes 1 ms."""
    return STEP_US


def linear(agg: StepAggregates) -> float:
    """A trivial step-time law (µs)."""
    return 6000.0 + 20.0 * agg.dc_count + 0.1 * agg.pf_tokens


def col(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def requests_of(result) -> list[dict]:
    return result.requests.to_pylist()


# ------------------------------------------------------------------ hand-checked cases


def test_one_request_prefills_in_budget_sized_chunks_then_decodes() -> None:
    w = Workload(arrival_us=[0.0], prompt_tokens=[5000], output_tokens=[4])
    result = replay(w, server(), constant)
    steps = result.steps
    assert col(steps, "pf_tokens") == [2048, 2048, 904, 0, 0, 0]
    assert col(steps, "pf_ctx_tokens") == [0, 2048 * 2048, 904 * 4096, 0, 0, 0]
    assert col(steps, "pf_sampling") == [0, 0, 1, 0, 0, 0]  # the chunk finishing the prompt
    assert col(steps, "dc_ctx_sum") == [0, 0, 0, 5000, 5001, 5002]
    assert col(steps, "blocks_allocated") == [128, 256, 313, 313, 313, 313]
    assert col(steps, "ts_start_ns") == [i * STEP_US * 1e3 for i in range(6)]
    (req,) = requests_of(result)
    assert (req["first_token_step"], req["first_token_us"]) == (2, 3 * STEP_US)
    assert (req["finished_step"], req["finished_us"]) == (5, 6 * STEP_US)
    assert req["status"] == "finished" and req["generated_tokens"] == 4
    lat = blis_latencies(result, alphas=(0.0, 100.0, 10.0))
    assert lat["ttft_us"][0] == 3 * STEP_US + 10.0
    assert lat["e2e_us"][0] == 6 * STEP_US + 100.0 + 10.0 * 4
    assert lat["itl_us"][0] == pytest.approx((6140.0 - 3010.0) / 3)


def test_second_request_is_admitted_with_the_budget_left() -> None:
    w = Workload(arrival_us=[0.0, 0.0], prompt_tokens=[1500, 1000], output_tokens=[3, 3])
    result = replay(w, server(), constant)
    steps = result.steps
    # step 0: 1500 + 548; step 1: A decodes, B its last 452 tokens (context 548)
    assert col(steps, "pf_tokens")[:2] == [2048, 452]
    assert col(steps, "pf_count")[:2] == [2, 1]
    assert col(steps, "pf_ctx_tokens")[1] == 452 * 548
    assert col(steps, "dc_count")[:4] == [0, 1, 2, 1]
    a, b = requests_of(result)
    assert (a["scheduled_step"], b["scheduled_step"]) == (0, 0)
    assert (a["first_token_step"], b["first_token_step"]) == (0, 1)
    assert (a["finished_step"], b["finished_step"]) == (2, 3)


def test_max_num_seqs_holds_a_third_request_in_the_queue() -> None:
    w = Workload(arrival_us=[0.0, 0.0, 0.0], prompt_tokens=[10, 10, 10],
                 output_tokens=[3, 5, 2])
    result = replay(w, server(seqs=2), constant)
    a, b, c = requests_of(result)
    assert a["finished_step"] == 2  # tokens at the end of steps 0, 1, 2
    assert c["queued_step"] == 0 and c["scheduled_step"] == 3  # the freed slot
    assert c["scheduled_us"] == 3 * STEP_US and c["finished_step"] == 4
    assert col(result.steps, "waiting_depth")[:4] == [1, 1, 1, 0]
    assert max(col(result.steps, "running_depth")) == 2


def test_running_out_of_kv_blocks_preempts_the_last_running_request() -> None:
    # 4-token blocks, 6 in all: two 8-token prompts take 2 blocks each; their decodes need
    # a 3rd block at context 8 and a 4th at context 12 — the 4th does not fit for both
    w = Workload(arrival_us=[0.0, 0.0], prompt_tokens=[8, 8], output_tokens=[10, 10])
    limits = server(block_size=4, blocks=6)
    result = replay(w, limits, constant, detail=True)
    steps, (a, b) = result.steps, requests_of(result)
    assert col(steps, "num_preempted") == [0] * 5 + [1] + [0] * 9
    assert (a["num_preemptions"], b["num_preemptions"]) == (0, 1)
    assert col(steps, "kv_blocks_free")[:6] == [2, 0, 0, 0, 0, 2]
    # B had 5 tokens out when preempted; it waits for A (done at step 9), then recomputes
    # its 8 + 5 known tokens in one chunk, and decodes its last 4 tokens
    assert a["finished_step"] == 9
    assert col(steps, "pf_tokens")[10] == 13 and col(steps, "preempted_before")[10] == 1
    assert (b["finished_step"], b["generated_tokens"], b["first_token_step"]) == (14, 10, 0)
    stays = stay_table(result.log, w)
    assert list(stays["end"]).count(STAY_PREEMPTED) == 1
    assert list(stays["output_end"]) == [10, 5, 10]  # A; B before and after preemption


def test_prefix_cache_hit_skips_whole_cached_blocks_only() -> None:
    # group 0's prefix is 40 tokens: 2 full 16-token blocks can be shared
    w = Workload(arrival_us=[0.0, 0.0, 2500.0], prompt_tokens=[100, 100, 50],
                 output_tokens=[5, 5, 5], prefix_group=[0, 0, 0], prefix_tokens=[40, 40, 40])
    result = replay(w, server(blocks=100), constant, detail=True)
    members = step_members(result.log, w, 16).to_pandas()
    # blocks are cached when allocated: B, admitted right after A in the same step,
    # already reuses the prefix blocks A computes in that step
    first = members[members["step_id"] == 0].set_index("request")
    assert list(first["computed"]) == [0, 32] and list(first["blocks_cached"]) == [0, 2]
    late = members[(members["request"] == 2) & members["prefill"]]
    assert list(late["computed"]) == [32] and list(late["scheduled"]) == [18]
    assert list(late["blocks_cached"]) == [2]
    assert col(result.steps, "blocks_cached")[3] == 2 + 2  # B (decoding) and C
    # the three hold 7 + 7 + 4 blocks; the 2 cached ones are stored once for all three
    assert col(result.steps, "kv_blocks_free")[3] == 100 - (7 + 7 + 4 - 2 * 2)
    without = replay(w, server(blocks=100, prefix_caching=False),
                     constant)
    assert col(without.steps, "pf_tokens")[3] == 50


def test_released_prefix_stays_cached_until_allocation_evicts_it() -> None:
    # A computes group 0's prefix and leaves; B (same group) hits it; C fills the KV so
    # the cache is evicted; D (same group) must compute its prefix again
    w = Workload(arrival_us=[0.0, 10_000.0, 20_000.0, 40_000.0],
                 prompt_tokens=[64, 64, 120, 64], output_tokens=[1, 1, 2, 1],
                 prefix_group=[0, 0, -1, 0], prefix_tokens=[48, 48, 0, 48])
    result = replay(w, server(blocks=8), constant,
                    detail=True)
    members = step_members(result.log, w, 16).to_pandas().set_index("request")
    assert members.loc[1, "computed"] == 48 and members.loc[1, "blocks_cached"] == 3
    assert members.loc[3, "computed"] == 0 and members.loc[3, "blocks_cached"] == 0
    free = col(result.steps, "kv_blocks_free")
    assert free[0] == 4 and free[1] == 4  # A's 4 blocks; B shares 3 of them + 1 own


def test_abort_removes_the_request_and_frees_its_blocks() -> None:
    w = Workload(arrival_us=[0.0, 0.0, 0.0], prompt_tokens=[32, 32, 32],
                 output_tokens=[100, 100, 5], abort_us=[3500.0, np.nan, 1500.0])
    limits = server(seqs=2, blocks=50)
    result = replay(w, limits, constant)
    a, b, c = requests_of(result)
    assert a["status"] == "aborted" and a["finished_step"] == 4 and a["generated_tokens"] == 4
    assert a["finished_us"] == 4 * STEP_US  # dropped at the first boundary after 3.5 ms
    assert c["status"] == "aborted" and c["scheduled_step"] is None  # dropped while waiting
    assert b["status"] == "finished" and b["generated_tokens"] == 100
    assert col(result.steps, "running_depth")[3:5] == [2, 1]
    assert col(result.steps, "kv_blocks_free")[-1] == 50 - math.ceil(131 / 16)


def test_a_request_abandoned_before_reaching_the_queue_never_runs() -> None:
    w = Workload(arrival_us=[0.0, 0.0], prompt_tokens=[32, 32], output_tokens=[3, 3],
                 pre_queue_us=[0.0, 5000.0], abort_us=[np.nan, 2000.0])
    kept, gone = requests_of(replay(w, server(), constant))
    assert kept["status"] == "finished" and gone["status"] == "aborted"
    assert math.isnan(gone["queued_us"]) and gone["finished_us"] == 2000.0
    assert "before entering the engine queue" in gone["reason"]


def test_requests_that_can_never_run_are_rejected_up_front() -> None:
    w = Workload(arrival_us=[0.0, 1.0, 2.0], prompt_tokens=[4000, 100, 30],
                 output_tokens=[200, 3, 2000])
    limits = server(blocks=100, max_model_len=4096)
    result = replay(w, limits, constant)
    long, ok, huge = requests_of(result)
    assert long["status"] == "rejected" and "max_model_len" in long["reason"]
    assert huge["status"] == "rejected" and "KV blocks" in huge["reason"]
    assert ok["status"] == "finished" and ok["reason"] is None
    assert rejections(w, limits)[1] is None


def test_step_time_sees_the_step_table_columns() -> None:
    seen: list[dict] = []

    def spy(agg: StepAggregates) -> float:
        seen.append(agg.as_dict())
        return 2000.0

    w = Workload(arrival_us=[0.0, 0.0], prompt_tokens=[700, 300], output_tokens=[3, 2])
    result = replay(w, server(512), spy)
    table = result.steps.to_pylist()
    assert [s["step_id"] for s in seen] == [row["step_id"] for row in table]
    for agg, row in zip(seen, table, strict=True):
        for name in AGGREGATES:
            assert agg[name] == pytest.approx(row[name]), name
    assert col(result.steps, "duration_us") == [2000.0] * len(table)


def test_aggregates_are_the_step_tables_columns() -> None:
    table = set(COMPOSITION_COLUMNS) | set(SUMMARY_FIELDS.values())
    assert set(AGGREGATES) == table - {"step_id", "ts_start_ns", "duration_us"}
    assert set(StepAggregates.__slots__) == {"step_id", *AGGREGATES}


def test_pre_queue_time_delays_queue_entry() -> None:
    w = Workload(arrival_us=[0.0, 100.0], prompt_tokens=[10, 10], output_tokens=[2, 2],
                 pre_queue_us=[500.0, 0.0])
    first, second = requests_of(replay(w, server(), constant))
    assert second["queued_us"] == 100.0 and second["scheduled_step"] == 0
    assert first["queued_us"] == 500.0 and first["scheduled_step"] == 1


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(arrival_us=[0.0, 5.0, 2.0]), "arrival_us"),
    (dict(prompt_tokens=[10, -1, 10]), "prompt_tokens"),
    (dict(output_tokens=[1, 0, 3]), "output_tokens"),
    (dict(prompt_tokens=[10, 10]), "prompt_tokens"),
    (dict(prefix_tokens=[0, 20, 0], prefix_group=[-1, 0, -1]), "prefix_tokens"),
    (dict(pre_queue_us=-5.0), "pre_queue_us"),
    (dict(arrival_us=[0.0, np.nan, 1.0]), "arrival_us"),
])
def test_bad_workloads_are_refused_naming_the_field(kwargs, field) -> None:
    base = dict(arrival_us=[0.0, 1.0, 2.0], prompt_tokens=[10, 10, 10],
                output_tokens=[1, 2, 3])
    with pytest.raises(ConfigError, match=field):
        Workload(**{**base, **kwargs})


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(max_num_batched_tokens=0, max_num_seqs=1), "max_num_batched_tokens"),
    (dict(max_num_batched_tokens=64, max_num_seqs=128), "max_num_seqs"),
    (dict(block_size=-16), "block_size"),
    (dict(num_gpu_blocks=2.5), "num_gpu_blocks"),
    (dict(max_model_len=0), "max_model_len"),
])
def test_bad_limits_are_refused_naming_the_field(kwargs, field) -> None:
    base = dict(max_num_batched_tokens=64, max_num_seqs=8, block_size=16, num_gpu_blocks=100)
    with pytest.raises(ConfigError, match=field):
        ServerLimits(**{**base, **kwargs})


def test_a_bad_step_time_is_reported_with_its_step() -> None:
    w = Workload(arrival_us=[0.0], prompt_tokens=[10], output_tokens=[3])
    with pytest.raises(ValueError, match="step 1"):
        replay(w, server(), lambda agg: 1000.0 if agg.step_id == 0 else math.nan)


# --------------------------------------------------------------- random workloads


def random_workload(seed: int, n: int = 300, rate: float = 400.0, groups: int = 3,
                    aborts: float = 0.05) -> Workload:
    """Bursty arrivals (requests/s), lognormal lengths, a few shared prefixes, some aborts."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.gamma(0.3, 1e6 / rate / 0.3, n))
    prompt = np.clip(np.exp(rng.normal(np.log(300), 0.8, n)), 4, 2500).astype(int)
    output = np.clip(np.exp(rng.normal(np.log(60), 0.9, n)), 1, 400).astype(int)
    group = np.where(rng.random(n) < 0.6, rng.integers(0, groups, n), -1) if groups else None
    prefix = np.where(group >= 0, np.minimum(prompt, 20 + 50 * group), 0) if groups else None
    abort = np.where(rng.random(n) < aborts, arrival + rng.exponential(3e4, n), np.nan)
    return Workload(arrival, prompt, output, prefix_group=group, prefix_tokens=prefix,
                    abort_us=abort, pre_queue_us=rng.exponential(500.0, n))


KV_STARVED = ServerLimits(1024, 32, block_size=16, num_gpu_blocks=330, max_model_len=2900)


def test_invariants_on_a_random_workload_without_preemption() -> None:
    w = random_workload(1, groups=0, aborts=0.0)
    result = replay(w, server(seqs=64, blocks=100_000), linear)
    steps, req = result.steps, result.requests
    assert result.steps.schema == STEP_SCHEMA
    generated = np.asarray(col(req, "generated_tokens"))
    assert set(col(req, "status")) == {"finished"}
    assert (generated == w.output_tokens).all()
    dc, pf = steps.column("dc_count").to_numpy(), steps.column("pf_tokens").to_numpy()
    assert dc.sum() == generated.sum() - len(w)  # every token but the first is a decode
    assert pf.sum() == w.prompt_tokens.sum()
    assert (pf + dc).max() <= 2048
    assert col(steps, "num_finished") and sum(col(steps, "num_finished")) == len(w)


def test_invariants_on_a_random_workload_with_preemption_and_caching() -> None:
    w = random_workload(2)
    result = replay(w, KV_STARVED, linear, detail=True)
    steps, req = result.steps, result.requests
    assert steps.schema == STEP_SCHEMA and steps.num_rows > 300
    assert steps.column("num_preempted").to_numpy().sum() > 20
    assert steps.column("blocks_cached").to_numpy().sum() > 0
    free = steps.column("kv_blocks_free").to_numpy()
    assert (free >= 0).all() and (free <= KV_STARVED.num_gpu_blocks).all()
    pf, dc = steps.column("pf_tokens").to_numpy(), steps.column("dc_count").to_numpy()
    assert (pf + dc).max() <= KV_STARVED.max_num_batched_tokens
    running = steps.column("running_depth").to_numpy()
    assert running.max() <= KV_STARVED.max_num_seqs
    status = np.asarray(col(req, "status"))
    assert set(status) <= {"finished", "aborted", "rejected"} and (status == "aborted").any()
    # every stay computes its known tokens beyond the cache hit (prompt, or prompt +
    # outputs after a preemption), then one token per decode; preemption loses that work
    stays = stay_table(result.log, w)
    members = step_members(result.log, w, 16).to_pandas()
    completed = stays["complete"] >= 0
    per_stay = np.bincount(_stay_of_members(members, stays), weights=members["scheduled"],
                           minlength=len(completed))
    prompt = w.prompt_tokens[stays["request"]]
    np.testing.assert_array_equal(
        per_stay[completed], (prompt + stays["output_end"] - 1 - stays["hit"])[completed])
    assert (pf + dc).sum() == per_stay.sum()
    assert (stays["output_end"] - stays["output"]).sum() == sum(col(req, "generated_tokens"))


def _stay_of_members(members, stays) -> np.ndarray:
    span = int(members["step_id"].max()) + 2
    key = stays["request"] * span + stays["start"]
    order = np.argsort(key)
    pos = np.searchsorted(key[order], members["request"] * span + members["step_id"],
                          "right") - 1
    return order[pos]


def test_detail_rebuilds_every_steps_aggregates() -> None:
    w = random_workload(3)
    result = replay(w, KV_STARVED, linear, detail=True)
    members = step_members(result.log, w, KV_STARVED.block_size)
    rebuilt = member_aggregates(members, result.steps.num_rows)
    for name in COMPOSITION_COLUMNS:
        np.testing.assert_array_equal(rebuilt[name], result.steps.column(name).to_numpy(),
                                      err_msg=name)
    per_step = np.bincount(members.column("step_id").to_numpy(),
                           minlength=result.steps.num_rows)
    np.testing.assert_array_equal(
        per_step, (result.steps.column("pf_count").to_numpy()
                   + result.steps.column("dc_count").to_numpy()))


def test_the_step_table_feeds_the_feature_code_unchanged(tmp_path) -> None:
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "exp-config.yaml").write_text(yaml.safe_dump({
        "model": "meta-llama/Llama-2-7b-hf", "hardware": "H100", "tensor_parallelism": 1,
        "max_num_batched_tokens": 1024, "max_num_seqs": 32}))
    exp = load_experiment(str(tmp_path), "e")
    result = replay(random_workload(4, n=60), KV_STARVED, linear, experiment="e")
    frame = feature_frame(exp, result.steps)
    assert len(frame) == result.steps.num_rows
    assert np.isfinite(frame.select_dtypes("number").to_numpy()).all()


def test_max_steps_leaves_requests_unfinished() -> None:
    w = random_workload(5, n=50)
    result = replay(w, KV_STARVED, linear, max_steps=40)
    assert result.steps.num_rows == 40 and result.stats.steps == 40
    assert "unfinished" in col(result.requests, "status")


# ---------------------------------------------------- the same policy, request by request


class Reference:
    """vLLM V1's schedule() written plainly: every running request, every step."""

    def __init__(self, w: Workload, limits: ServerLimits, step_time) -> None:
        self.w, self.lim, self.step_time = w, limits, step_time
        n, self.bs = len(w), limits.block_size
        self.group, full = prefix_blocks(w, limits)
        self.pool = KVPool(limits.num_gpu_blocks, full)
        self.rejected = [r is not None for r in rejections(w, limits)]
        self.computed, self.output, self.blocks, self.shared = ([0] * n for _ in range(4))
        self.hit, self.preempted = [0] * n, [0] * n
        self.pinned = [False] * n
        self.done = [False] * n
        self.running: list[int] = []
        self.waiting: list[int] = []
        self.rows: list[dict] = []

    def known(self, r: int) -> int:
        return int(self.w.prompt_tokens[r]) + self.output[r]

    def release(self, r: int) -> None:
        self.pool.give(self.blocks[r] - self.shared[r])
        if self.pinned[r]:
            self.pool.unpin(self.group[r])
        self.blocks[r] = self.shared[r] = self.hit[r] = 0
        self.pinned[r] = False

    def cache_prefix(self, r: int, computed: int) -> None:
        """Full blocks are cached when allocated: covering the group's prefix caches it."""
        g, pool = self.group[r], self.pool
        if g >= 0 and pool.cached[g] < pool.full[g] <= computed // self.bs:
            if not self.pinned[r]:
                pool.pin(g)
                self.pinned[r] = True
            self.shared[r] += pool.complete(g)

    def run(self) -> list[dict]:
        w, bs, pool = self.w, self.bs, self.pool
        order = list(w.queue_order)
        aborts = sorted((a, r) for r, a in enumerate(w.abort_us) if not math.isnan(a))
        now, k = float(w.queue_us[order[0]]), 0
        while True:
            while order and w.queue_us[order[0]] <= now:
                r = order.pop(0)
                if not self.rejected[r] and not w.abort_us[r] <= w.queue_us[r]:
                    self.waiting.append(r)
            while aborts and aborts[0][0] <= now:
                r = aborts.pop(0)[1]
                if r in self.waiting:
                    self.waiting.remove(r)
                elif r in self.running:
                    self.running.remove(r)
                    self.release(r)
                self.done[r] = True
            if not self.running and not self.waiting:
                if not order:
                    return self.rows
                now = max(now, float(w.queue_us[order[0]]))
                continue
            budget, batch, preempted = self.lim.max_num_batched_tokens, [], 0
            i = 0
            while i < len(self.running) and budget > 0:
                r = self.running[i]
                c = self.computed[r]
                t = min(self.known(r) - c, budget)
                need = -(-(c + t) // bs) - self.blocks[r]
                victim = None
                while need > pool.available:
                    victim = self.running.pop()
                    self.release(victim)
                    self.computed[victim] = 0
                    self.preempted[victim] += 1
                    self.waiting.insert(0, victim)
                    preempted += 1
                    if victim == r:
                        break
                if victim == r:
                    break
                pool.take(need)
                self.blocks[r] += need
                self.cache_prefix(r, c + t)
                batch.append((r, t, c))
                budget -= t
                i += 1
            while (not preempted and self.waiting and budget > 0
                   and len(self.running) < self.lim.max_num_seqs):
                r = self.waiting[0]
                g = self.group[r]
                hit = min(pool.cached[g], (self.known(r) - 1) // bs) if g >= 0 else 0
                t = min(self.known(r) - hit * bs, budget)
                blocks = -(-(hit * bs + t) // bs)
                if not pool.admit(g, hit, blocks - hit):
                    break
                self.waiting.pop(0)
                self.running.append(r)
                self.computed[r], self.blocks[r], self.shared[r] = hit * bs, blocks, hit
                self.hit[r], self.pinned[r] = hit, hit > 0
                self.cache_prefix(r, hit * bs + t)
                batch.append((r, t, hit * bs))
                budget -= t
            if not batch:
                continue
            agg = self.aggregates(k, batch, preempted, now)
            dt = self.step_time(agg)
            self.rows.append({**agg.as_dict(), "duration_us": dt, "ts_start_us": now})
            for r, t, _ in batch:
                self.computed[r] += t
                if self.computed[r] == self.known(r):
                    self.output[r] += 1
                    if self.output[r] == w.output_tokens[r]:
                        self.running.remove(r)
                        self.release(r)
                        self.done[r] = True
            now += dt
            k += 1

    def aggregates(self, k: int, batch: list, preempted: int, now: float) -> StepAggregates:
        agg = StepAggregates()
        agg.step_id = k
        pf = [(t, c, int(self.w.prompt_tokens[r])) for r, t, c in batch
              if not (t == 1 and self.output[r] >= 1 and c + 1 == self.known(r))]
        dc = [c for r, t, c in batch
              if t == 1 and self.output[r] >= 1 and c + 1 == self.known(r)]
        agg.pf_count = agg.num_prefill_reqs = len(pf)
        agg.pf_tokens = agg.prefill_tokens = sum(t for t, _, _ in pf)
        agg.pf_tokens_sq = sum(t * t for t, _, _ in pf)
        agg.pf_ctx_tokens = sum(t * c for t, c, _ in pf)
        agg.pf_prompt_tokens = sum(t * s for t, _, s in pf)
        agg.pf_kv_tokens = sum(c + t for t, c, _ in pf)
        agg.pf_ctx_max = max((c + t for t, c, _ in pf), default=0)
        agg.pf_sampling = sum(c + t >= s for t, c, s in pf)
        agg.dc_count = agg.num_decode_reqs = agg.decode_tokens = len(dc)
        agg.dc_ctx_sum, agg.dc_ctx_max = sum(dc), max(dc, default=0)
        agg.blocks_allocated = sum(self.blocks[r] for r, _, _ in batch)
        agg.blocks_cached = sum(self.hit[r] for r, _, _ in batch)
        agg.preempted_before = sum(self.preempted[r] > 0 for r, _, _ in batch)
        agg.running_depth, agg.waiting_depth = len(self.running), len(self.waiting)
        agg.num_finished = sum(c + t == self.known(r) and self.output[r] + 1
                               == self.w.output_tokens[r] for r, t, c in batch)
        agg.num_preempted = preempted
        agg.kv_blocks_total = self.pool.num_blocks
        agg.kv_blocks_free = self.pool.available
        agg.kv_usage_ratio = 1.0 - agg.kv_blocks_free / self.pool.num_blocks
        return agg


@pytest.mark.parametrize(("seed", "limits"), [
    (10, KV_STARVED),
    (11, ServerLimits(512, 16, block_size=8, num_gpu_blocks=420, max_model_len=1200)),
    (12, ServerLimits(2048, 64, block_size=16, num_gpu_blocks=100_000)),
    (13, ServerLimits(256, 48, block_size=32, num_gpu_blocks=120)),
    (14, ServerLimits(64, 16, block_size=4, num_gpu_blocks=700, prefix_caching=False)),
])
def test_fast_engine_equals_the_request_by_request_schedule(seed, limits) -> None:
    w = random_workload(seed, n=200)
    fast = replay(w, limits, linear)
    rows = Reference(w, limits, linear).run()
    assert fast.steps.num_rows == len(rows) > 100
    if seed == 11:
        assert "rejected" in col(fast.requests, "status")
    for name in (*AGGREGATES, "duration_us", "ts_start_us"):
        got = fast.steps.column("ts_start_ns").to_numpy() / 1e3 if name == "ts_start_us" \
            else fast.steps.column(name).to_numpy()
        want = np.array([row[name] for row in rows], np.float64)
        if name == "ts_start_us":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
