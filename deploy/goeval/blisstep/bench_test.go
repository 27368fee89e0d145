package blisstep

import "testing"

// BenchmarkStepTime256 measures one StepTime call for a 256-request batch (2 prefill
// chunks + 254 decodes) on Mixtral-8x7B, H100, TP 1, for every family.
func BenchmarkStepTime256(b *testing.B) {
	for _, fam := range Families {
		e, g := goldenEvaluator(b, fam, "unseen-mixtral-h100-tp1")
		batch := g.batch(b, "batch_256")
		if len(batch.Requests) != 256 {
			b.Fatalf("batch_256 has %d requests", len(batch.Requests))
		}
		b.Run(fam, func(b *testing.B) {
			b.ReportAllocs()
			sum := 0.0
			for i := 0; i < b.N; i++ {
				sum += e.StepTime(batch)
			}
			if sum <= 0 {
				b.Fatal("no step time")
			}
		})
	}
}
