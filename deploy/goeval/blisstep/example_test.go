package blisstep_test

import (
	"fmt"

	"github.com/inference-sim/blis-model/deploy/goeval/blisstep"
)

func Example() {
	rel, err := blisstep.LoadRelease("../testdata/releases/rece")
	if err != nil {
		panic(err)
	}
	ev, err := rel.NewEvaluator(blisstep.Deployment{
		Model: "mistralai/Mixtral-8x7B-v0.1", Hardware: "H100", TensorParallelism: 2,
		MaxNumBatchedTokens: 8192, MaxNumSeqs: 256})
	if err != nil {
		panic(err)
	}
	batch := &blisstep.Batch{Requests: []blisstep.Request{
		{Prefill: true, ScheduledTokens: 2048, ComputedTokens: 4096, PromptTokens: 8192},
		{ScheduledTokens: 1, ComputedTokens: 1500},
	}}
	p50 := ev.StepTime(batch)
	p99, _ := ev.Quantile(batch, 0.99)
	fmt.Println(ev.ConfigKey, ev.Calibrated, p50 > 0, p99 >= p50, ev.Alpha0())
	// Output: mistralai/mixtral-8x7b-v0.1|H100|tp2|bf16|mnbt8192|mns256 true true true 15563.2
}
