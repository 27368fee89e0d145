package blisstep

// Request is one request of the batch BLIS schedules in a step.
//
// A prefill request computes ScheduledTokens prompt tokens this step (t) after
// ComputedTokens already computed (c) of a PromptTokens-long prompt (s); a decode
// request computes one token (ScheduledTokens = 1) with a context of ComputedTokens.
// BlocksAllocated (KV blocks held) and Preempted (preempted at least once before) are
// optional: only some families' features read them.
type Request struct {
	Prefill         bool
	ScheduledTokens int
	ComputedTokens  int
	PromptTokens    int
	BlocksAllocated float64
	Preempted       bool
}

// StepState is the scheduler state at the step (optional; zero = idle queue, empty
// KV cache, no preemption).
type StepState struct {
	RunningDepth float64 // requests running
	WaitingDepth float64 // requests waiting in the queue
	NumPreempted float64 // requests preempted at this step
	KVUsageRatio float64 // GPU KV-cache usage, 0..1
}

// Batch is one scheduler step: its requests and the scheduler state.
type Batch struct {
	Requests []Request
	State    StepState
}

// Aggregates are the per-step composition aggregates of blis_model/ingest/steps.py
// (COMPOSITION_COLUMNS) plus the scheduler state, all float64 as in the step table.
type Aggregates struct {
	PfCount, PfTokens, PfTokensSq, PfCtxTokens, PfPromptTokens, PfKVTokens, PfCtxMax float64
	PfSampling, DcCount, DcCtxSum, DcCtxMax, BlocksAllocated, PreemptedBefore        float64
	RunningDepth, WaitingDepth, NumPreempted, KVUsageRatio                           float64
}

// Aggregate computes a batch's step aggregates exactly as ingest does from a trace:
// t = scheduled, c = computed before, s = prompt; sums in request order.
func Aggregate(b *Batch) Aggregates {
	// locals (not struct fields) keep the sums in registers: this loop is the hot path
	var pfCount, pfTokens, pfSq, pfCtx, pfPrompt, pfKV, pfMax, pfSampling float64
	var dcCount, dcSum, dcMax, blocks, preempted float64
	for i := range b.Requests {
		r := &b.Requests[i]
		c := float64(r.ComputedTokens)
		if r.Prefill {
			t := float64(r.ScheduledTokens)
			pfCount++
			pfTokens += t
			pfSq += t * t
			pfCtx += t * c
			pfPrompt += t * float64(r.PromptTokens)
			kv := c + t
			pfKV += kv
			if kv > pfMax {
				pfMax = kv
			}
			if kv >= float64(r.PromptTokens) {
				pfSampling++
			}
		} else {
			dcCount++
			dcSum += c
			if c > dcMax {
				dcMax = c
			}
		}
		blocks += r.BlocksAllocated
		if r.Preempted {
			preempted++
		}
	}
	return Aggregates{PfCount: pfCount, PfTokens: pfTokens, PfTokensSq: pfSq,
		PfCtxTokens: pfCtx, PfPromptTokens: pfPrompt, PfKVTokens: pfKV, PfCtxMax: pfMax,
		PfSampling: pfSampling, DcCount: dcCount, DcCtxSum: dcSum, DcCtxMax: dcMax,
		BlocksAllocated: blocks, PreemptedBefore: preempted,
		RunningDepth: b.State.RunningDepth, WaitingDepth: b.State.WaitingDepth,
		NumPreempted: b.State.NumPreempted, KVUsageRatio: b.State.KVUsageRatio}
}

// byName maps the step-table column names to Aggregates fields (tests, debugging).
func (g *Aggregates) byName() map[string]float64 {
	return map[string]float64{
		"pf_count": g.PfCount, "pf_tokens": g.PfTokens, "pf_tokens_sq": g.PfTokensSq,
		"pf_ctx_tokens": g.PfCtxTokens, "pf_prompt_tokens": g.PfPromptTokens,
		"pf_kv_tokens": g.PfKVTokens, "pf_ctx_max": g.PfCtxMax, "pf_sampling": g.PfSampling,
		"dc_count": g.DcCount, "dc_ctx_sum": g.DcCtxSum, "dc_ctx_max": g.DcCtxMax,
		"blocks_allocated": g.BlocksAllocated, "preempted_before": g.PreemptedBefore,
		"running_depth": g.RunningDepth, "waiting_depth": g.WaitingDepth,
		"num_preempted": g.NumPreempted, "kv_usage_ratio": g.KVUsageRatio,
	}
}
