package blisstep

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
)

// CalibrationRecord is how a release chose one configuration's terms (coefficients.json
// model.calibration.per_config, every family): the reference terms unchanged ("none"),
// one factor on the host-time terms only ("host": the overheads — µs per kernel launch,
// layer, request, step — paid by the machine's CPU and driver), one scale on the whole
// prediction ("scale"), or the configuration's own terms shrunk toward the reference
// with a prior worth λ steps ("terms@λ"), chosen by time-ordered cross-validation on its
// steps.
type CalibrationRecord struct {
	Choice     string      `json:"choice"`      // "none", "host", "scale" or "terms@λ"
	Reason     string      `json:"reason"`      // why, in words
	Steps      int         `json:"steps"`       // the configuration's steps
	Folds      int         `json:"folds"`       // rolling-origin folds used (0: too few steps)
	Scale      float64     `json:"scale"`       // the factor, when Choice is "scale"
	HostFactor float64     `json:"host_factor"` // the host factor h, when Choice is "host"
	PriorSteps float64     `json:"prior_steps"` // λ, when Choice is "terms@λ"
	Moved      []MovedTerm `json:"moved"`       // terms away from their global value
	// HostEffect is the host share of the configuration's steps under its terms over
	// that under the global terms (nil: unknown, or no host part in the family).
	HostEffect *float64 `json:"host_effect"`
	// MachineHostFactor is the machine host factor its reference carried (0: none, the
	// configuration was calibrated against the global or its own terms).
	MachineHostFactor float64 `json:"machine_host_factor"`
}

// MovedTerm is one term of a configuration that moved from its global value or sits at
// a bound of its physical range.
type MovedTerm struct {
	Term    string     `json:"term"`
	Global  float64    `json:"global"`
	Config  float64    `json:"config"`
	Ratio   *float64   `json:"ratio"`    // Config / Global; nil when Global is 0
	Range   []*float64 `json:"range"`    // [lower, upper]; upper nil = unbounded
	AtBound string     `json:"at_bound"` // "lower", "upper" or ""
}

// Kept reports whether the release kept the reference terms for the configuration
// (Choice "none"): its steps were seen, and the global (or base) terms predicted them
// as well as anything fit on them.
func (c *CalibrationRecord) Kept() bool { return c.Choice == "none" }

// MachineHost is a machine's host factor (coefficients.json
// model.calibration.machine_host_factors): the factor on the host-time terms with which
// a configuration the release never saw on that machine is predicted — the median host
// effect of the machine's configurations, or 1 when that median is within one standard
// error of 1.
type MachineHost struct {
	Factor         float64            `json:"factor"`
	Median         float64            `json:"median"`
	StandardError  *float64           `json:"standard_error"`
	Configurations map[string]float64 `json:"configurations"` // key → host effect
}

// calibrationBlock is model.calibration as the evaluator reads it. HostTerms and
// MachineHost are absent from releases made before machine host factors existed (their
// configurations never seen run on the global terms).
type calibrationBlock struct {
	PerConfig   map[string]CalibrationRecord `json:"per_config"`
	HostTerms   []string                     `json:"host_terms"`
	MachineHost map[string]MachineHost       `json:"machine_host_factors"`
}

func parseCalibration(model json.RawMessage) (calibrationBlock, error) {
	var doc struct {
		Calibration calibrationBlock `json:"calibration"`
	}
	if err := json.Unmarshal(model, &doc); err != nil {
		return calibrationBlock{}, fmt.Errorf("calibration: %w", err)
	}
	block := doc.Calibration
	for key, rec := range block.PerConfig {
		switch {
		case rec.Choice == "none", rec.Choice == "host", rec.Choice == "scale",
			strings.HasPrefix(rec.Choice, "terms@"):
		default:
			return calibrationBlock{}, fmt.Errorf("calibration of %s: unknown choice %q", key,
				rec.Choice)
		}
	}
	for machine, m := range block.MachineHost {
		if !(m.Factor > 0) || math.IsInf(m.Factor, 0) {
			return calibrationBlock{}, fmt.Errorf("machine host factor of %s must be finite "+
				"and > 0, got %v", machine, m.Factor)
		}
	}
	return block, nil
}

// MachineOf is the machine of a configuration key: its canonical GPU, the second "|"
// field ("" without one). An exp-config names no host, so the GPU name stands for the
// machine (CPU, driver) the configuration was measured on.
func MachineOf(configKey string) string {
	parts := strings.Split(configKey, "|")
	if len(parts) < 2 {
		return ""
	}
	return parts[1]
}

// hostScaling is what a family applies to a configuration's global terms: Factor on the
// host-time terms (Terms, by name, as the release lists them), 1 = nothing.
type hostScaling struct {
	Factor float64
	Terms  map[string]bool
}

func (h hostScaling) applies() bool { return h.Factor != 1 }

// of is the multiplier of a named term.
func (h hostScaling) of(name string) float64 {
	if h.Terms[name] {
		return h.Factor
	}
	return 1
}
