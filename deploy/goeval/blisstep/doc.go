// Package blisstep evaluates blis-model releases natively, so BLIS can run every model
// family (picf, overlap, hfd_tl, mole_rd, bsr_ard, hybrid, rece) as its latency model.
//
// LoadRelease reads a release folder (coefficients.json, model_configs/); NewEvaluator
// resolves a deployment's model shape, GPU and coefficient set (the terms calibrated on
// its configuration key, else the global ones — with its machine's host factor on their
// host-time terms when the release holds one — or RECE's embedding blend); StepTime,
// Quantile, StepTimeStd and Alpha0..Alpha2 answer BLIS's questions in µs. Features,
// aggregation and routing mirror the Python library to 1e-9 relative (golden vectors
// in testdata/, written by `python -m blis_model.releases.golden_vectors deploy/goeval/testdata`).
package blisstep
