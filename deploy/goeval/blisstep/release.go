package blisstep

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Release is a blis-model release folder read back: coefficients.json (the family's
// native coefficients and the BLIS alphas) and its model_configs/.
type Release struct {
	Dir     string
	Version string
	Family  string
	Alphas  [3]float64 // α0 queueing µs, α1 post-decode µs, α2 µs per output token
	model   json.RawMessage
	// calibration is the choice of terms per configuration key (empty for releases
	// made before the record existed).
	calibration map[string]CalibrationRecord
	// hostTerms are the terms a machine host factor multiplies; machineHost the factor
	// per machine (both empty for releases made before machine host factors existed).
	hostTerms   map[string]bool
	machineHost map[string]MachineHost
}

// MachineHostFactors are the release's machine host factors by machine (the GPU field
// of a configuration key; nil for releases without them).
func (r *Release) MachineHostFactors() map[string]MachineHost {
	if len(r.machineHost) == 0 {
		return nil
	}
	out := make(map[string]MachineHost, len(r.machineHost))
	for k, v := range r.machineHost {
		out[k] = v
	}
	return out
}

// hostScalingFor is the host scaling of a configuration's global terms: its machine's
// factor when the release never saw the configuration (no calibration record), else 1.
func (r *Release) hostScalingFor(configKey string) hostScaling {
	none := hostScaling{Factor: 1}
	if _, seen := r.calibration[configKey]; seen {
		return none
	}
	m, ok := r.machineHost[MachineOf(configKey)]
	if !ok {
		return none
	}
	return hostScaling{Factor: m.Factor, Terms: r.hostTerms}
}

type coefficientsFile struct {
	Version        string          `json:"version"`
	Family         string          `json:"family"`
	Model          json.RawMessage `json:"model"`
	BlisProjection struct {
		AlphaCoeffs []struct {
			Index int     `json:"index"`
			Name  string  `json:"name"`
			Value float64 `json:"value"`
		} `json:"alpha_coeffs"`
	} `json:"blis_projection"`
}

// manifestFile is the part of manifest.json the evaluator checks: the release version
// and the SHA-256 of every other file of the release.
type manifestFile struct {
	Version string            `json:"version"`
	Files   map[string]string `json:"files"`
}

// LoadRelease reads the release in dir, as the Python library does: manifest.json must
// be there (a folder without it is an unfinished publish, not a release) and every file
// it lists must match its SHA-256 — coefficients.json and model_configs/ included.
func LoadRelease(dir string) (*Release, error) {
	rawManifest, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, fmt.Errorf("release %s: no manifest.json (missing, or an unfinished "+
			"publish): %w", dir, err)
	}
	var manifest manifestFile
	if err := json.Unmarshal(rawManifest, &manifest); err != nil {
		return nil, fmt.Errorf("release %s: manifest.json: %w", dir, err)
	}
	if manifest.Version == "" || len(manifest.Files) == 0 {
		return nil, fmt.Errorf("release %s: manifest.json has no version or file checksums", dir)
	}
	if _, listed := manifest.Files["coefficients.json"]; !listed {
		return nil, fmt.Errorf("release %s: manifest.json does not list coefficients.json", dir)
	}
	names := make([]string, 0, len(manifest.Files))
	for name := range manifest.Files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if err := checkFile(dir, name, manifest.Files[name]); err != nil {
			return nil, fmt.Errorf("release %s: %w", dir, err)
		}
	}
	raw, err := os.ReadFile(filepath.Join(dir, "coefficients.json"))
	if err != nil {
		return nil, fmt.Errorf("release %s: %w", dir, err)
	}
	rel, err := ParseCoefficients(raw)
	if err != nil {
		return nil, fmt.Errorf("release %s: %w", dir, err)
	}
	if rel.Version != manifest.Version {
		return nil, fmt.Errorf("release %s: coefficients.json is version %s, manifest.json %s",
			dir, rel.Version, manifest.Version)
	}
	rel.Dir = dir
	return rel, nil
}

// checkFile verifies one release file against its SHA-256 from the manifest.
func checkFile(dir, name, want string) error {
	if strings.Contains(name, "..") || filepath.IsAbs(name) {
		return fmt.Errorf("manifest.json lists an invalid file name %q", name)
	}
	raw, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name)))
	if err != nil {
		return err
	}
	sum := sha256.Sum256(raw)
	if got := hex.EncodeToString(sum[:]); got != want {
		return fmt.Errorf("%s does not match its checksum in manifest.json", name)
	}
	return nil
}

// ParseCoefficients reads a release from the bytes of its coefficients.json (model
// configs must then be given to NewEvaluator through Deployment.ModelConfig). Nothing
// is checked against a manifest: prefer LoadRelease for a release folder.
func ParseCoefficients(raw []byte) (*Release, error) {
	var doc coefficientsFile
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("coefficients.json: %w", err)
	}
	if doc.Family == "" || len(doc.Model) == 0 {
		return nil, fmt.Errorf("coefficients.json: no family or model")
	}
	rel := &Release{Version: doc.Version, Family: doc.Family, model: doc.Model}
	if len(doc.BlisProjection.AlphaCoeffs) != 3 {
		return nil, fmt.Errorf("coefficients.json: blis_projection needs 3 alphas, got %d",
			len(doc.BlisProjection.AlphaCoeffs))
	}
	for i, a := range doc.BlisProjection.AlphaCoeffs {
		rel.Alphas[i] = a.Value
	}
	if _, err := buildFamily(doc.Family, doc.Model); err != nil { // fail fast on bad releases
		return nil, err
	}
	block, err := parseCalibration(doc.Model)
	if err != nil {
		return nil, fmt.Errorf("coefficients.json: %w", err)
	}
	rel.calibration, rel.machineHost = block.PerConfig, block.MachineHost
	rel.hostTerms = make(map[string]bool, len(block.HostTerms))
	for _, t := range block.HostTerms {
		rel.hostTerms[t] = true
	}
	return rel, nil
}

// Deployment is the server configuration BLIS simulates (exp-config.yaml's knobs).
type Deployment struct {
	Model               string // HF model id, e.g. "mistralai/Mixtral-8x7B-v0.1"
	Hardware            string // GPU name or alias, e.g. "H100"
	TensorParallelism   int
	MaxNumBatchedTokens int
	MaxNumSeqs          int
	Quantization        string // overrides the model config's ("" = from config.json)
	// ModelConfig optionally gives the HF config.json bytes; by default it is read from
	// <release>/model_configs/<model id without org, lower-cased>/config.json.
	ModelConfig []byte
	// HardwareSpec optionally replaces the built-in catalog entry of Hardware.
	HardwareSpec *Hardware
}

// ModelConfigName is the model_configs/ folder of a model id, as BLIS looks it up.
func ModelConfigName(modelID string) string {
	short := strings.TrimSpace(modelID)
	if i := strings.Index(short, "/"); i >= 0 {
		short = short[i+1:]
	}
	return strings.ToLower(short)
}

// ConfigKey identifies a configuration exactly as blis_model's ServerConfig.config_key:
// model lower-cased | hardware | tpN | quantization (bf16 if none) | mnbtN | mnsN.
// Hardware must be the canonical catalog name (NewEvaluator resolves aliases and case:
// "h100" and "H100-SXM" are "H100"), as the Python library records it.
func ConfigKey(d Deployment, a Arch) string {
	quant := a.Quantization
	if quant == "" {
		quant = "bf16"
	}
	return fmt.Sprintf("%s|%s|tp%d|%s|mnbt%d|mns%d", strings.ToLower(d.Model), d.Hardware,
		d.TensorParallelism, quant, d.MaxNumBatchedTokens, d.MaxNumSeqs)
}

// Evaluator answers BLIS's latency questions for one deployment of one release. It is
// immutable and safe for concurrent use; StepTime does not allocate.
type Evaluator struct {
	Release    *Release
	Deployment Deployment
	Arch       Arch
	Hardware   Hardware
	ConfigKey  string
	// Calibrated is true when the release holds terms fit on this configuration; else
	// the global terms (RECE: the embedding-weighted specialist blend) are used.
	Calibrated bool
	// Calibration is how the release chose this configuration's terms (nil when it
	// holds no record of it: a configuration never seen). A record with Choice "none"
	// means its steps were seen and the reference terms kept: no terms of its own
	// (Calibrated false), except RECE, which stores the kept set as its specialist.
	Calibration *CalibrationRecord
	// MachineHostFactor multiplies the host-time terms of the global terms this
	// configuration runs on: its machine's host factor when the release never saw it
	// and holds one for that machine (Release.MachineHostFactors), else 1.
	MachineHostFactor float64
	ctx               featureContext
	model             familyModel
}

// NewEvaluator resolves the deployment's model shape, GPU and coefficient set.
func (r *Release) NewEvaluator(d Deployment) (*Evaluator, error) {
	if d.TensorParallelism <= 0 || d.MaxNumBatchedTokens <= 0 || d.MaxNumSeqs <= 0 {
		return nil, fmt.Errorf("deployment: tensor parallelism, max_num_batched_tokens and " +
			"max_num_seqs must be > 0")
	}
	cfg := d.ModelConfig
	if cfg == nil {
		path := filepath.Join(r.Dir, "model_configs", ModelConfigName(d.Model), "config.json")
		var err error
		if cfg, err = os.ReadFile(path); err != nil {
			return nil, fmt.Errorf("model config of %s: %w", d.Model, err)
		}
	}
	arch, err := ParseArch(cfg, d.Model, d.Quantization)
	if err != nil {
		return nil, err
	}
	var hw Hardware
	if d.HardwareSpec != nil {
		hw = *d.HardwareSpec
	} else if hw, err = LookupHardware(d.Hardware); err != nil {
		return nil, err
	} else {
		d.Hardware = hw.Name // canonical, so configuration keys match the release's
	}
	if err := hw.validate(); err != nil {
		return nil, err
	}
	fam, err := buildFamily(r.Family, r.model)
	if err != nil {
		return nil, err
	}
	e := &Evaluator{Release: r, Deployment: d, Arch: arch, Hardware: hw,
		ConfigKey: ConfigKey(d, arch), ctx: newFeatureContext(arch, hw, d.TensorParallelism)}
	consts := e.ctx.constants(d.MaxNumBatchedTokens, d.MaxNumSeqs)
	host := r.hostScalingFor(e.ConfigKey)
	if e.model, e.Calibrated, err = fam.resolve(e.ConfigKey, consts, host); err != nil {
		return nil, err
	}
	if !e.Calibrated {
		e.MachineHostFactor = host.Factor
	} else {
		e.MachineHostFactor = 1
	}
	if rec, ok := r.calibration[e.ConfigKey]; ok {
		e.Calibration = &rec
	}
	return e, nil
}

// StepTime is the predicted duration of one scheduler step, µs (the family's mean; p50
// for RECE).
func (e *Evaluator) StepTime(b *Batch) float64 {
	g := Aggregate(b)
	var f Features
	e.ctx.compute(&g, &f)
	// static calls (a type switch, not the interface) keep g and f on the stack
	switch m := e.model.(type) {
	case *linearModel:
		return m.predict(&g, &f)
	case *overlapModel:
		return m.predict(&g, &f)
	case *hfdModel:
		return m.predict(&g, &f)
	case *moleModel:
		return m.predict(&g, &f)
	case *bsrModel:
		return m.predict(&g, &f)
	case *hybridModel:
		return m.predict(&g, &f)
	case *receModel:
		return m.predict(&g, &f)
	}
	panic(fmt.Sprintf("blisstep: no static dispatch for %T", e.model))
}

// Quantile is quantile q (e.g. 0.9) of the step time, µs, for families fit with
// quantiles (rece, hybrid); an error for other families or levels not fitted.
func (e *Evaluator) Quantile(b *Batch, q float64) (float64, error) {
	g := Aggregate(b)
	var f Features
	e.ctx.compute(&g, &f)
	return e.model.quantile(g, f, q)
}

// StepTimeStd is the predictive standard deviation of the step time, µs, for the
// Bayesian families (bsr_ard, hybrid); ok is false for the others.
func (e *Evaluator) StepTimeStd(b *Batch) (std float64, ok bool) {
	g := Aggregate(b)
	var f Features
	e.ctx.compute(&g, &f)
	return e.model.std(g, f)
}

// Quantiles lists the quantile levels the release can answer (nil if none).
func (e *Evaluator) Quantiles() []float64 { return e.model.levels() }

// Features returns every feature of the step by registry name (debugging, tests).
func (e *Evaluator) Features(b *Batch) map[string]float64 {
	g := Aggregate(b)
	var f Features
	e.ctx.compute(&g, &f)
	out := make(map[string]float64, numFeatures)
	for i, n := range FeatureNames {
		out[n] = f[i]
	}
	return out
}

// Alpha0 is BLIS's α0: queueing / API overhead before a request's first step, µs.
func (e *Evaluator) Alpha0() float64 { return e.Release.Alphas[0] }

// Alpha1 is BLIS's α1: fixed post-decode overhead per request, µs.
func (e *Evaluator) Alpha1() float64 { return e.Release.Alphas[1] }

// Alpha2 is BLIS's α2: output-token processing time, µs per output token.
func (e *Evaluator) Alpha2() float64 { return e.Release.Alphas[2] }
