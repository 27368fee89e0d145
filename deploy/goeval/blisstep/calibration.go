package blisstep

import (
	"encoding/json"
	"fmt"
	"strings"
)

// CalibrationRecord is how a release chose one configuration's terms (coefficients.json
// model.calibration.per_config, every family): the reference terms unchanged ("none"),
// one scale on the whole prediction ("scale"), or the configuration's own terms shrunk
// toward the reference with a prior worth λ steps ("terms@λ"), chosen by time-ordered
// cross-validation on its steps.
type CalibrationRecord struct {
	Choice     string      `json:"choice"`      // "none", "scale" or "terms@λ"
	Reason     string      `json:"reason"`      // why, in words
	Steps      int         `json:"steps"`       // the configuration's steps
	Folds      int         `json:"folds"`       // rolling-origin folds used (0: too few steps)
	Scale      float64     `json:"scale"`       // the factor, when Choice is "scale"
	PriorSteps float64     `json:"prior_steps"` // λ, when Choice is "terms@λ"
	Moved      []MovedTerm `json:"moved"`       // terms away from their global value
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

func parseCalibration(model json.RawMessage) (map[string]CalibrationRecord, error) {
	var doc struct {
		Calibration struct {
			PerConfig map[string]CalibrationRecord `json:"per_config"`
		} `json:"calibration"`
	}
	if err := json.Unmarshal(model, &doc); err != nil {
		return nil, fmt.Errorf("calibration: %w", err)
	}
	for key, rec := range doc.Calibration.PerConfig {
		if rec.Choice != "none" && rec.Choice != "scale" && !strings.HasPrefix(rec.Choice, "terms@") {
			return nil, fmt.Errorf("calibration of %s: unknown choice %q", key, rec.Choice)
		}
	}
	return doc.Calibration.PerConfig, nil
}
