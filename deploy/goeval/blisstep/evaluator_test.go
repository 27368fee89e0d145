package blisstep

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func goldenEvaluator(t testing.TB, family, deployment string) (*Evaluator, *goldenFile) {
	t.Helper()
	g := loadGolden(t)
	rel, err := LoadRelease(filepath.Join(goldenDir, g.Releases[family]))
	if err != nil {
		t.Fatal(err)
	}
	e, err := rel.NewEvaluator(g.deployment(deployment))
	if err != nil {
		t.Fatal(err)
	}
	return e, g
}

func TestStepTimeDoesNotAllocate(t *testing.T) {
	for _, fam := range Families {
		e, g := goldenEvaluator(t, fam, "unseen-mixtral-h100-tp1")
		b := g.batch(t, "batch_256")
		if n := testing.AllocsPerRun(20, func() { e.StepTime(b) }); n != 0 {
			t.Errorf("%s: StepTime allocates %v times per call", fam, n)
		}
	}
}

func TestQuantileAndStdAvailability(t *testing.T) {
	e, g := goldenEvaluator(t, "picf", "llama8b-h100-tp1")
	b := g.batch(t, "decode_64")
	if _, err := e.Quantile(b, 0.9); err == nil {
		t.Error("picf has no quantiles: Quantile must fail")
	}
	if _, ok := e.StepTimeStd(b); ok {
		t.Error("picf has no predictive std")
	}
	r, _ := goldenEvaluator(t, "rece", "llama8b-h100-tp1")
	if _, err := r.Quantile(b, 0.75); err == nil || !strings.Contains(err.Error(), "not fitted") {
		t.Errorf("an unfitted level must fail naming the fitted ones, got %v", err)
	}
	p50, _ := r.Quantile(b, 0.5)
	p99, _ := r.Quantile(b, 0.99)
	if r.StepTime(b) != p50 || p99 < p50 {
		t.Errorf("rece: StepTime is p50 and levels do not cross: p50 %v p99 %v", p50, p99)
	}
}

func TestDeploymentErrors(t *testing.T) {
	g := loadGolden(t)
	rel, err := LoadRelease(filepath.Join(goldenDir, g.Releases["picf"]))
	if err != nil {
		t.Fatal(err)
	}
	d := g.deployment("llama8b-h100-tp1")
	bad := d
	bad.Hardware = "TPU-v9"
	if _, err := rel.NewEvaluator(bad); err == nil || !strings.Contains(err.Error(), "unknown hardware") {
		t.Errorf("unknown GPU: %v", err)
	}
	bad = d
	bad.Model = "nobody/unknown-model"
	if _, err := rel.NewEvaluator(bad); err == nil {
		t.Error("a model without config must fail")
	}
	bad = d
	bad.TensorParallelism = 0
	if _, err := rel.NewEvaluator(bad); err == nil {
		t.Error("TP 0 must fail")
	}
	// a model config given inline, and a GPU alias: same configuration key rules as Python
	cfg, err := os.ReadFile(filepath.Join(rel.Dir, "model_configs", "llama-3.1-8b", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	ok := d
	ok.Model, ok.ModelConfig, ok.Hardware = "Org/Custom-8B", cfg, "h100-sxm"
	e, err := rel.NewEvaluator(ok)
	if err != nil {
		t.Fatal(err)
	}
	if e.ConfigKey != "org/custom-8b|H100|tp1|bf16|mnbt8192|mns256" || e.Calibrated ||
		e.Calibration != nil || e.Hardware.Name != "H100" {
		t.Errorf("config key %q calibrated %v GPU %s", e.ConfigKey, e.Calibrated, e.Hardware.Name)
	}
	// a configuration of the training corpus, however its GPU is spelled, finds its own
	// calibration record (and its own terms, when the record chose any)
	for _, spelling := range []string{"H100", "h100", "H100-SXM", " h100-sxm5 "} {
		same := d
		same.Hardware = spelling
		e, err := rel.NewEvaluator(same)
		if err != nil {
			t.Fatal(err)
		}
		if e.Calibration == nil || e.Calibrated == e.Calibration.Kept() ||
			e.ConfigKey != g.ConfigKeys["llama8b-h100-tp1"] {
			t.Errorf("hardware %q: config key %q calibrated %v record %+v", spelling, e.ConfigKey,
				e.Calibrated, e.Calibration)
		}
	}
}

func TestLoadReleaseNeedsItsManifestAndChecksums(t *testing.T) {
	g := loadGolden(t)
	src := filepath.Join(goldenDir, g.Releases["picf"])
	copyRelease := func(t *testing.T) string {
		dir := t.TempDir()
		err := filepath.Walk(src, func(path string, info os.FileInfo, err error) error {
			if err != nil || info.IsDir() {
				return err
			}
			rel, _ := filepath.Rel(src, path)
			raw, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, rel)), 0o755); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(dir, rel), raw, 0o644)
		})
		if err != nil {
			t.Fatal(err)
		}
		return dir
	}
	if _, err := LoadRelease(copyRelease(t)); err != nil {
		t.Fatalf("an intact release: %v", err)
	}
	unfinished := copyRelease(t)
	os.Remove(filepath.Join(unfinished, "manifest.json"))
	if _, err := LoadRelease(unfinished); err == nil || !strings.Contains(err.Error(), "manifest.json") {
		t.Errorf("a folder without manifest.json must not load: %v", err)
	}
	tampered := copyRelease(t)
	path := filepath.Join(tampered, "coefficients.json")
	raw, _ := os.ReadFile(path)
	os.WriteFile(path, append(raw, ' '), 0o644)
	if _, err := LoadRelease(tampered); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a coefficients.json that does not match its checksum must not load: %v", err)
	}
	config := copyRelease(t)
	path = filepath.Join(config, "model_configs", "llama-3.1-8b", "config.json")
	os.WriteFile(path, []byte(`{}`), 0o644)
	if _, err := LoadRelease(config); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a changed model config must not load: %v", err)
	}
}

func TestReleaseErrors(t *testing.T) {
	if _, err := ParseCoefficients([]byte(`{"family": "mystery", "model": {},
		"blis_projection": {"alpha_coeffs": [{"value": 1}, {"value": 2}, {"value": 3}]}}`)); err == nil ||
		!strings.Contains(err.Error(), "not supported") {
		t.Errorf("unknown family: %v", err)
	}
	if _, err := ParseCoefficients([]byte(`{"family": "picf", "model": {"features": ["warp_drive_us"],
		"global": [{"feature": "warp_drive_us", "value": 1}], "per_config": {}},
		"blis_projection": {"alpha_coeffs": [{"value": 1}, {"value": 2}, {"value": 3}]}}`)); err == nil ||
		!strings.Contains(err.Error(), "not implemented") {
		t.Errorf("unknown feature: %v", err)
	}
	if _, err := LoadRelease(t.TempDir()); err == nil {
		t.Error("a folder without coefficients.json is no release")
	}
}

func TestArchFromConfig(t *testing.T) {
	moe := []byte(`{"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8,
		"num_key_value_heads": 2, "vocab_size": 100, "n_routed_experts": 16,
		"num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 128,
		"first_k_dense_replace": 1, "n_shared_experts": 2,
		"quantization_config": {"quant_method": "AWQ", "bits": 4}}`)
	a, err := ParseArch(moe, "x/deepseek-ish", "")
	if err != nil {
		t.Fatal(err)
	}
	if a.NumMoELayers != 3 || a.NumDenseLayers() != 1 || a.HeadDim != 8 ||
		a.SharedExpertIntermediateSize != 64 || a.Quantization != "awq" || a.WeightBytesPerParam != 0.5 {
		t.Errorf("parsed %+v", a)
	}
	dense := []byte(`{"text_config": {"num_hidden_layers": 2, "hidden_size": 32,
		"num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 10,
		"torch_dtype": "float8_e4m3fn"}}`)
	if a, err = ParseArch(dense, "", ""); err != nil || a.Quantization != "fp8" || a.NumKVHeads != 4 {
		t.Errorf("parsed %+v, %v", a, err)
	}
	if _, err = ParseArch([]byte(`{"hidden_size": 32}`), "m", ""); err == nil {
		t.Error("missing layers must fail")
	}
}

// A configuration the release never saw, on a machine with a calibrated configuration
// (H200), runs on the global terms with that machine's host factor on their host-time
// terms; the calibrated configuration itself runs on its own terms (factor 1); a machine
// without a factor, or a release made before machine host factors, runs the global terms.
func TestMachineHostFactors(t *testing.T) {
	for _, fam := range []string{"picf", "overlap", "hfd_tl", "bsr_ard"} {
		seen, g := goldenEvaluator(t, fam, "llama8b-h200-tp1")
		if seen.Calibration == nil || seen.MachineHostFactor != 1 {
			t.Errorf("%s: the calibrated H200 configuration: record %+v factor %v", fam,
				seen.Calibration, seen.MachineHostFactor)
		}
		unseen, _ := goldenEvaluator(t, fam, "unseen-qwen7b-h200-tp1")
		factors := unseen.Release.MachineHostFactors()
		h200, ok := factors["H200"]
		if !ok || unseen.MachineHostFactor != h200.Factor || unseen.Calibrated {
			t.Fatalf("%s: unseen H200 configuration: factor %v, release %+v", fam,
				unseen.MachineHostFactor, factors)
		}
		if _, ok := h200.Configurations[seen.ConfigKey]; !ok {
			t.Errorf("%s: H200's factor does not list %s", fam, seen.ConfigKey)
		}
		// the same release without machine host factors (as released before them)
		raw, err := os.ReadFile(filepath.Join(goldenDir, g.Releases[fam], "coefficients.json"))
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]interface{}
		if err := json.Unmarshal(raw, &doc); err != nil {
			t.Fatal(err)
		}
		cal := doc["model"].(map[string]interface{})["calibration"].(map[string]interface{})
		delete(cal, "machine_host_factors")
		delete(cal, "host_terms")
		old, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		rel, err := ParseCoefficients(old)
		if err != nil {
			t.Fatalf("%s: a release without machine host factors must load: %v", fam, err)
		}
		d := g.deployment("unseen-qwen7b-h200-tp1")
		d.ModelConfig, err = os.ReadFile(filepath.Join(goldenDir, g.Releases[fam], "model_configs",
			ModelConfigName(d.Model), "config.json"))
		if err != nil {
			t.Fatal(err)
		}
		plain, err := rel.NewEvaluator(d)
		if err != nil {
			t.Fatal(err)
		}
		b := g.batch(t, "decode_64")
		if plain.MachineHostFactor != 1 || rel.MachineHostFactors() != nil {
			t.Errorf("%s: no factors, yet factor %v", fam, plain.MachineHostFactor)
		}
		if h200.Factor != 1 && plain.StepTime(b) == unseen.StepTime(b) {
			t.Errorf("%s: the machine host factor %v changes nothing", fam, h200.Factor)
		}
	}
}

func TestMachineOf(t *testing.T) {
	if MachineOf("meta-llama/llama-3.1-8b|H200|tp1|bf16|mnbt8192|mns256") != "H200" ||
		MachineOf("t") != "" {
		t.Error("the machine is the second field of a configuration key")
	}
	bad := `{"family": "picf", "model": {"features": ["step_overhead"],
		"global": [{"feature": "step_overhead", "value": 1}], "per_config": {},
		"calibration": {"per_config": {}, "machine_host_factors": {"H200": {"factor": 0}}}},
		"blis_projection": {"alpha_coeffs": [{"value": 1}, {"value": 2}, {"value": 3}]}}`
	if _, err := ParseCoefficients([]byte(bad)); err == nil || !strings.Contains(err.Error(), "> 0") {
		t.Errorf("a machine host factor of 0 must not load: %v", err)
	}
}
