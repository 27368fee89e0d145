package blisstep

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The golden vectors are written by the Python library (python -m blis_model.golden
// deploy/goeval/testdata); every number here must match it to 1e-9 relative.
const goldenDir = "../testdata"

type goldenFile struct {
	Schema    string `json:"schema"`
	Tolerance struct {
		Relative float64 `json:"relative"`
		Absolute float64 `json:"absolute_us"`
	} `json:"tolerance"`
	RequestFields []string          `json:"request_fields"`
	Releases      map[string]string `json:"releases"`
	Deployments   map[string]struct {
		Model               string `json:"model"`
		Hardware            string `json:"hardware"`
		TensorParallelism   int    `json:"tensor_parallelism"`
		MaxNumBatchedTokens int    `json:"max_num_batched_tokens"`
		MaxNumSeqs          int    `json:"max_num_seqs"`
		Quantization        string `json:"quantization"`
	} `json:"deployments"`
	Batches map[string]struct {
		Requests [][]interface{}    `json:"requests"`
		State    map[string]float64 `json:"state"`
	} `json:"batches"`
	ConfigKeys map[string]string                        `json:"config_keys"`
	Steps      map[string]map[string]float64            `json:"steps"`
	Features   map[string]map[string]map[string]float64 `json:"features"`
	Cases      []map[string]interface{}                 `json:"cases"`
}

// unusedStepColumns are step aggregates no feature reads (the Go batch omits them).
var unusedStepColumns = map[string]bool{"blocks_cached": true}

func loadGolden(t testing.TB) *goldenFile {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(goldenDir, "golden_v1.json"))
	if err != nil {
		t.Fatalf("golden vectors: %v (run python -m blis_model.releases.golden_vectors deploy/goeval/testdata)", err)
	}
	var g goldenFile
	if err := json.Unmarshal(raw, &g); err != nil {
		t.Fatal(err)
	}
	if g.Schema != "blis-goeval-golden/1" {
		t.Fatalf("golden schema %q: this evaluator reads blis-goeval-golden/1", g.Schema)
	}
	if strings.Join(g.RequestFields, ",") !=
		"phase,scheduled,computed,prompt,blocks_allocated,preemptions" {
		t.Fatalf("request fields changed: %v", g.RequestFields)
	}
	return &g
}

func (g *goldenFile) batch(t testing.TB, name string) *Batch {
	t.Helper()
	spec, ok := g.Batches[name]
	if !ok {
		t.Fatalf("no batch %s", name)
	}
	b := &Batch{State: StepState{RunningDepth: spec.State["running_depth"],
		WaitingDepth: spec.State["waiting_depth"], NumPreempted: spec.State["num_preempted"],
		KVUsageRatio: spec.State["kv_usage_ratio"]}}
	if len(spec.State) != 4 {
		t.Fatalf("batch %s: state fields changed: %v", name, spec.State)
	}
	for _, row := range spec.Requests {
		num := func(i int) float64 { return row[i].(float64) }
		b.Requests = append(b.Requests, Request{Prefill: row[0].(string) == "prefill",
			ScheduledTokens: int(num(1)), ComputedTokens: int(num(2)), PromptTokens: int(num(3)),
			BlocksAllocated: num(4), Preempted: num(5) > 0})
	}
	return b
}

func (g *goldenFile) deployment(name string) Deployment {
	d := g.Deployments[name]
	return Deployment{Model: d.Model, Hardware: d.Hardware, TensorParallelism: d.TensorParallelism,
		MaxNumBatchedTokens: d.MaxNumBatchedTokens, MaxNumSeqs: d.MaxNumSeqs,
		Quantization: d.Quantization}
}

func (g *goldenFile) close(got, want float64) bool {
	return math.Abs(got-want) <= math.Max(g.Tolerance.Relative*math.Abs(want), g.Tolerance.Absolute)
}

func TestGoldenAggregates(t *testing.T) {
	g := loadGolden(t)
	for name, want := range g.Steps {
		b := g.batch(t, name)
		agg := Aggregate(b)
		got := agg.byName()
		for col, w := range want {
			v, ok := got[col]
			if !ok {
				if !unusedStepColumns[col] {
					t.Errorf("step column %s is unknown to the Go evaluator", col)
				}
				continue
			}
			if v != w {
				t.Errorf("batch %s: %s = %v, Python %v", name, col, v, w)
			}
		}
	}
}

func evaluators(t testing.TB, g *goldenFile) map[string]*Evaluator {
	t.Helper()
	out := map[string]*Evaluator{}
	for fam, dir := range g.Releases {
		rel, err := LoadRelease(filepath.Join(goldenDir, dir))
		if err != nil {
			t.Fatal(err)
		}
		if rel.Family != fam {
			t.Fatalf("release %s has family %s", dir, rel.Family)
		}
		for dep := range g.Deployments {
			e, err := rel.NewEvaluator(g.deployment(dep))
			if err != nil {
				t.Fatalf("%s/%s: %v", fam, dep, err)
			}
			out[fam+"/"+dep] = e
		}
	}
	return out
}

func TestGoldenFeatures(t *testing.T) {
	g := loadGolden(t)
	rel, err := LoadRelease(filepath.Join(goldenDir, g.Releases["picf"]))
	if err != nil {
		t.Fatal(err)
	}
	for dep, batches := range g.Features {
		e, err := rel.NewEvaluator(g.deployment(dep))
		if err != nil {
			t.Fatal(err)
		}
		if e.ConfigKey != g.ConfigKeys[dep] {
			t.Errorf("%s: config key %q, Python %q", dep, e.ConfigKey, g.ConfigKeys[dep])
		}
		for batch, want := range batches {
			got := e.Features(g.batch(t, batch))
			if len(want) != len(got) {
				t.Errorf("Python has %d features, Go %d", len(want), len(got))
			}
			for name, w := range want {
				v, ok := got[name]
				if !ok {
					t.Errorf("feature %s is not implemented by the Go evaluator", name)
					continue
				}
				if !g.close(v, w) {
					t.Errorf("%s/%s: %s = %.17g, Python %.17g", dep, batch, name, v, w)
				}
			}
		}
	}
}

func TestGoldenCases(t *testing.T) {
	g := loadGolden(t)
	evs := evaluators(t, g)
	seen := map[string]bool{}
	machineScaled := map[string]bool{} // families with a case on a machine host factor
	for _, c := range g.Cases {
		fam, dep, batch := c["release"].(string), c["deployment"].(string), c["batch"].(string)
		seen[fam] = true
		e := evs[fam+"/"+dep]
		b := g.batch(t, batch)
		where := fmt.Sprintf("%s/%s/%s", fam, dep, batch)
		if e.ConfigKey != c["config_key"].(string) {
			t.Errorf("%s: config key %q, Python %q", where, e.ConfigKey, c["config_key"])
		}
		if e.Calibrated != c["calibrated"].(bool) {
			t.Errorf("%s: calibrated %v, Python %v", where, e.Calibrated, c["calibrated"])
		}
		want, recorded := c["calibration_choice"].(string)
		if recorded != (e.Calibration != nil) || (recorded && e.Calibration.Choice != want) {
			t.Errorf("%s: calibration record %+v, Python %v", where, e.Calibration,
				c["calibration_choice"])
		}
		if want, ok := c["machine_host_factor"].(float64); !ok || e.MachineHostFactor != want {
			t.Errorf("%s: machine host factor %v, Python %v", where, e.MachineHostFactor,
				c["machine_host_factor"])
		} else if want != 1 {
			machineScaled[fam] = true
		}
		for i, a := range c["alphas"].([]interface{}) {
			if e.Release.Alphas[i] != a.(float64) {
				t.Errorf("%s: alpha %d = %v, Python %v", where, i, e.Release.Alphas[i], a)
			}
		}
		if got, want := e.StepTime(b), c["step_time_us"].(float64); !g.close(got, want) {
			t.Errorf("%s: StepTime %.17g µs, Python %.17g (rel %.2g)", where, got, want,
				math.Abs(got-want)/math.Abs(want))
		}
		if want, ok := c["std_us"].(float64); ok {
			got, has := e.StepTimeStd(b)
			if !has || !g.close(got, want) {
				t.Errorf("%s: std %.17g µs (%v), Python %.17g", where, got, has, want)
			}
		} else if _, has := e.StepTimeStd(b); has {
			t.Errorf("%s: Go has a std, Python none", where)
		}
		levels := 0
		for key, v := range c {
			if !strings.HasPrefix(key, "p") || key == "p" {
				continue
			}
			var pct float64
			if _, err := fmt.Sscanf(key, "p%g", &pct); err != nil {
				continue
			}
			levels++
			got, err := e.Quantile(b, pct/100)
			if err != nil || !g.close(got, v.(float64)) {
				t.Errorf("%s: %s = %.17g (%v), Python %.17g", where, key, got, err, v)
			}
		}
		if levels != len(e.Quantiles()) {
			t.Errorf("%s: Python has %d quantiles, Go %d", where, levels, len(e.Quantiles()))
		}
	}
	for _, fam := range Families {
		if !seen[fam] {
			t.Errorf("no golden case of family %s", fam)
		}
	}
	for _, fam := range []string{"picf", "hfd_tl", "bsr_ard"} {
		if !machineScaled[fam] {
			t.Errorf("no golden case of %s predicts with a machine host factor", fam)
		}
	}
}

// TestEveryPythonFamilyIsSupported: the golden file holds one release per family of the
// Python registry (any of them can win --family auto), so each must be evaluable here.
func TestEveryPythonFamilyIsSupported(t *testing.T) {
	g := loadGolden(t)
	supported := map[string]bool{}
	for _, f := range Families {
		supported[f] = true
	}
	for fam := range g.Releases {
		if !supported[fam] {
			t.Errorf("family %q of the Python registry is not supported by the Go evaluator "+
				"(supported: %v): BLIS could not load a release of it", fam, Families)
		}
	}
}
