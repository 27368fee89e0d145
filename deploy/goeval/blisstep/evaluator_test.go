package blisstep

import (
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
