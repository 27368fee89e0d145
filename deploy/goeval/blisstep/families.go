package blisstep

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
)

// A family is a release's model as read from coefficients.json; resolve picks the
// coefficient set of one configuration (calibrated terms, else global or blended; the
// global terms with host's factor on their host-time terms — a machine host factor — for
// the families with a host part: picf, overlap, hfd_tl, bsr_ard).
type family interface {
	resolve(configKey string, consts map[string]float64, host hostScaling) (familyModel, bool, error)
}

// A familyModel is one configuration's resolved model.
type familyModel interface {
	predict(g *Aggregates, f *Features) float64
	quantile(g Aggregates, f Features, q float64) (float64, error) // by value: no escape
	std(g Aggregates, f Features) (float64, bool)
	levels() []float64
}

// Families lists the families this package evaluates, in release order.
var Families = []string{"picf", "overlap", "hfd_tl", "mole_rd", "bsr_ard", "hybrid", "rece"}

func buildFamily(name string, raw json.RawMessage) (family, error) {
	var fam family
	var err error
	switch name {
	case "picf":
		fam, err = parsePICF(raw)
	case "overlap":
		fam, err = parseOverlap(raw)
	case "hfd_tl":
		fam, err = parseHFDTL(raw)
	case "mole_rd":
		fam, err = parseMoLERD(raw)
	case "bsr_ard":
		fam, err = parseBSRARD(raw)
	case "hybrid":
		fam, err = parseHybrid(raw)
	case "rece":
		fam, err = parseRECE(raw)
	default:
		return nil, fmt.Errorf("family %q is not supported by the Go evaluator (supported: %v)",
			name, Families)
	}
	if err != nil {
		return nil, fmt.Errorf("family %s: %w", name, err)
	}
	return fam, nil
}

// -- shared pieces ------------------------------------------------------------------------

type coefRow struct {
	Feature string  `json:"feature"`
	Value   float64 `json:"value"`
}

type valueUnit struct {
	Value float64 `json:"value"`
}

// linear is Σ_k β_k·f_k over named features, accumulated in the release's order and
// skipping zero coefficients (as models.linear.linear_predict).
type linear struct {
	ids  []int
	coef []float64
}

func (l *linear) eval(f *Features) float64 {
	out := 0.0
	for i, id := range l.ids {
		if b := l.coef[i]; b != 0 {
			out += b * f[id]
		}
	}
	return out
}

func ids(names []string) ([]int, error) {
	out := make([]int, len(names))
	for i, n := range names {
		id, err := featureID(n)
		if err != nil {
			return nil, err
		}
		out[i] = id
	}
	return out, nil
}

// table checks a coefficient table against the expected feature names and returns the
// linear term.
func table(rows []coefRow, names []string) (linear, error) {
	if len(rows) != len(names) {
		return linear{}, fmt.Errorf("coefficient table has %d rows, expected %d", len(rows), len(names))
	}
	l := linear{coef: make([]float64, len(rows))}
	for i, r := range rows {
		if r.Feature != names[i] {
			return linear{}, fmt.Errorf("coefficient %d is %q, expected %q", i, r.Feature, names[i])
		}
		l.coef[i] = r.Value
	}
	var err error
	l.ids, err = ids(names)
	return l, err
}

// hostScaled is the linear term with each coefficient × host's multiplier of its
// feature (names in the term's order).
func (l linear) hostScaled(names []string, host hostScaling) linear {
	out := linear{ids: l.ids, coef: make([]float64, len(l.coef))}
	for i, b := range l.coef {
		out.coef[i] = b * host.of(names[i])
	}
	return out
}

func quantileKey(q float64) string {
	return "p" + strconv.FormatFloat(q*100, 'g', 6, 64)
}

func matchLevel(levels []float64, q float64) (int, error) {
	for i, v := range levels {
		if math.Abs(v-q) < 1e-9 {
			return i, nil
		}
	}
	return 0, fmt.Errorf("quantile %g not fitted; fitted: %v", q, levels)
}

type noQuantiles struct{}

func (noQuantiles) quantile(Aggregates, Features, float64) (float64, error) {
	return 0, fmt.Errorf("this family has no quantile coefficients")
}
func (noQuantiles) levels() []float64 { return nil }

type noStd struct{}

func (noStd) std(Aggregates, Features) (float64, bool) { return 0, false }

// -- PICF -----------------------------------------------------------------------------------

type picf struct {
	features  []string
	global    linear
	perConfig map[string]linear
}

func parsePICF(raw json.RawMessage) (family, error) {
	var doc struct {
		Features  []string             `json:"features"`
		Global    []coefRow            `json:"global"`
		PerConfig map[string][]coefRow `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	m := &picf{features: doc.Features, perConfig: map[string]linear{}}
	var err error
	if m.global, err = table(doc.Global, doc.Features); err != nil {
		return nil, err
	}
	for k, rows := range doc.PerConfig {
		if m.perConfig[k], err = table(rows, doc.Features); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
	}
	return m, nil
}

type linearModel struct {
	l linear
	noQuantiles
	noStd
}

func (m *linearModel) predict(_ *Aggregates, f *Features) float64 { return m.l.eval(f) }

func (m *picf) resolve(key string, _ map[string]float64, host hostScaling) (familyModel, bool, error) {
	if l, ok := m.perConfig[key]; ok {
		return &linearModel{l: l}, true, nil
	}
	if host.applies() {
		return &linearModel{l: m.global.hostScaled(m.features, host)}, false, nil
	}
	return &linearModel{l: m.global}, false, nil
}

// -- OVERLAP --------------------------------------------------------------------------------

type overlap struct {
	gpu, cpu  []string
	power     float64
	global    [2]linear
	perConfig map[string][2]linear
}

func parseOverlap(raw json.RawMessage) (family, error) {
	var doc struct {
		Params struct {
			GPU   []string `json:"gpu_features"`
			CPU   []string `json:"cpu_features"`
			Power float64  `json:"power"`
		} `json:"params"`
		Features  []string             `json:"features"`
		Global    []coefRow            `json:"global"`
		PerConfig map[string][]coefRow `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	m := &overlap{gpu: doc.Params.GPU, cpu: doc.Params.CPU, power: doc.Params.Power,
		perConfig: map[string][2]linear{}}
	if !(m.power > 0) {
		return nil, fmt.Errorf("power must be > 0")
	}
	split := func(rows []coefRow) ([2]linear, error) {
		k := len(m.gpu)
		if len(rows) != k+len(m.cpu) {
			return [2]linear{}, fmt.Errorf("coefficient table has %d rows, expected %d",
				len(rows), k+len(m.cpu))
		}
		g, err := table(rows[:k], m.gpu)
		if err != nil {
			return [2]linear{}, err
		}
		c, err := table(rows[k:], m.cpu)
		return [2]linear{g, c}, err
	}
	var err error
	if m.global, err = split(doc.Global); err != nil {
		return nil, err
	}
	for k, rows := range doc.PerConfig {
		if m.perConfig[k], err = split(rows); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
	}
	return m, nil
}

type overlapModel struct {
	gpu, cpu linear
	power    float64
	noQuantiles
	noStd
}

// dot is Σ β_k·f_k without skipping zeros (a matrix product in the Python library).
func (l *linear) dot(f *Features) float64 {
	out := 0.0
	for i, id := range l.ids {
		out += l.coef[i] * f[id]
	}
	return out
}

func (m *overlapModel) predict(_ *Aggregates, f *Features) float64 {
	g, c := m.gpu.dot(f), m.cpu.dot(f)
	top := math.Max(math.Max(g, c), 1e-12)
	return top * math.Pow(math.Pow(g/top, m.power)+math.Pow(c/top, m.power), 1.0/m.power)
}

func (m *overlap) resolve(key string, _ map[string]float64, host hostScaling) (familyModel, bool, error) {
	sets, ok := m.perConfig[key]
	if !ok {
		sets = m.global
		if host.applies() { // the CPU expert is the host part
			sets[1] = sets[1].hostScaled(m.cpu, hostScaling{Factor: host.Factor,
				Terms: allOf(m.cpu)})
		}
	}
	return &overlapModel{gpu: sets[0], cpu: sets[1], power: m.power}, ok, nil
}

func allOf(names []string) map[string]bool {
	out := make(map[string]bool, len(names))
	for _, n := range names {
		out[n] = true
	}
	return out
}

// -- HFD-TL ---------------------------------------------------------------------------------

type hfdtl struct {
	base      linear
	groups    []linear // base split by scale group, in group order
	cpuGroup  int      // index of the overheads group ("cpu"), -1 with a single group
	residual  []string
	perConfig map[string]hfdTerms
}

type hfdTerms struct {
	scale    []float64
	residual linear
}

func groupNames(mode string) ([]string, error) {
	switch mode {
	case "single":
		return []string{"all"}, nil
	case "kind":
		return []string{"gpu", "cpu"}, nil
	}
	return nil, fmt.Errorf("scale_groups must be 'kind' or 'single', got %q", mode)
}

func parseHFDTL(raw json.RawMessage) (family, error) {
	var doc struct {
		Params struct {
			ScaleGroups string   `json:"scale_groups"`
			Residual    []string `json:"residual_features"`
		} `json:"params"`
		Features    []string            `json:"features"`
		ScaleGroups map[string][]string `json:"scale_groups"`
		Base        []coefRow           `json:"base"`
		PerConfig   map[string]struct {
			Scale    map[string]valueUnit `json:"scale"`
			Residual []coefRow            `json:"residual"`
		} `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	names, err := groupNames(doc.Params.ScaleGroups)
	if err != nil {
		return nil, err
	}
	m := &hfdtl{residual: doc.Params.Residual, perConfig: map[string]hfdTerms{}, cpuGroup: -1}
	for gi, g := range names {
		if g == "cpu" {
			m.cpuGroup = gi
		}
	}
	if m.base, err = table(doc.Base, doc.Features); err != nil {
		return nil, err
	}
	groupOf := map[string]int{}
	for gi, g := range names {
		for _, n := range doc.ScaleGroups[g] {
			groupOf[n] = gi
		}
	}
	m.groups = make([]linear, len(names))
	for i, n := range doc.Features {
		gi, ok := groupOf[n]
		if !ok {
			return nil, fmt.Errorf("feature %s is in no scale group", n)
		}
		m.groups[gi].ids = append(m.groups[gi].ids, m.base.ids[i])
		m.groups[gi].coef = append(m.groups[gi].coef, m.base.coef[i])
	}
	for k, pc := range doc.PerConfig {
		t := hfdTerms{scale: make([]float64, len(names))}
		for gi, g := range names {
			v, ok := pc.Scale[g]
			if !ok {
				return nil, fmt.Errorf("per_config %s: no scale of group %s", k, g)
			}
			t.scale[gi] = v.Value
		}
		if t.residual, err = table(pc.Residual, m.residual); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
		m.perConfig[k] = t
	}
	return m, nil
}

type hfdModel struct {
	groups []linear
	terms  hfdTerms
	noQuantiles
	noStd
}

func (m *hfdModel) predict(_ *Aggregates, f *Features) float64 {
	out := 0.0
	for gi := range m.groups {
		out += m.groups[gi].eval(f) * m.terms.scale[gi]
	}
	return out + m.terms.residual.eval(f)
}

func (m *hfdtl) resolve(key string, _ map[string]float64, host hostScaling) (familyModel, bool, error) {
	if t, ok := m.perConfig[key]; ok {
		return &hfdModel{groups: m.groups, terms: t}, true, nil
	}
	if host.applies() { // γ = 1 but γ_cpu = the factor; δ = 0
		if m.cpuGroup < 0 {
			return nil, false, fmt.Errorf("a machine host factor needs the overheads " +
				"scale group (scale_groups 'kind')")
		}
		t := hfdTerms{scale: make([]float64, len(m.groups))}
		for gi := range t.scale {
			t.scale[gi] = 1
		}
		t.scale[m.cpuGroup] = host.Factor
		ids, err := ids(m.residual)
		if err != nil {
			return nil, false, err
		}
		t.residual = linear{ids: ids, coef: make([]float64, len(ids))}
		return &hfdModel{groups: m.groups, terms: t}, false, nil
	}
	return &linearModel{l: m.base}, false, nil
}

// -- MoLE-RD --------------------------------------------------------------------------------

// regimes in models/regimes.py order; the last takes what the gates leave.
var regimeNames = []string{"saturation", "kv_pressure", "launch_bound", "compute_bound",
	"memory_bound"}

const (
	discreteLogRatio = 8.0
	minRegimeWeight  = 1e-9
)

type moleParams struct {
	GateWidth          float64  `json:"gate_width"`
	LaunchFloorUs      float64  `json:"launch_floor_us"`
	LaunchUsPerLayer   float64  `json:"launch_us_per_layer"`
	KVThreshold        float64  `json:"kv_threshold"`
	SaturationFraction float64  `json:"saturation_fraction"`
	ComputeFeatures    []string `json:"compute_features"`
	MemoryFeatures     []string `json:"memory_features"`
	LearnLaunchFloor   bool     `json:"learn_launch_floor"`
}

type molerd struct {
	params     moleParams
	compute    []int
	memory     []int
	launchIDs  []int // learned launch floor: Σ launchCoef·feature (mole_rd.LAUNCH_FEATURES)
	launchCoef []float64
	global     [5]linear
	perConfig  map[string][5]linear
}

func parseMoLERD(raw json.RawMessage) (family, error) {
	var doc struct {
		Params    moleParams                      `json:"params"`
		Features  []string                        `json:"features"`
		Regimes   []string                        `json:"regimes"`
		PerRegime map[string][]coefRow            `json:"per_regime"`
		PerConfig map[string]map[string][]coefRow `json:"per_config"`
		Launch    []coefRow                       `json:"launch_floor"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	if fmt.Sprint(doc.Regimes) != fmt.Sprint(regimeNames) {
		return nil, fmt.Errorf("regimes %v, the Go evaluator knows %v", doc.Regimes, regimeNames)
	}
	m := &molerd{params: doc.Params, perConfig: map[string][5]linear{}}
	var err error
	if m.compute, err = ids(doc.Params.ComputeFeatures); err != nil {
		return nil, err
	}
	if m.memory, err = ids(doc.Params.MemoryFeatures); err != nil {
		return nil, err
	}
	if doc.Params.LearnLaunchFloor {
		for _, row := range doc.Launch {
			id, err := featureID(row.Feature)
			if err != nil {
				return nil, err
			}
			m.launchIDs = append(m.launchIDs, id)
			m.launchCoef = append(m.launchCoef, row.Value)
		}
	}
	stack := func(tables map[string][]coefRow) ([5]linear, error) {
		var out [5]linear
		for k, r := range regimeNames {
			rows, ok := tables[r]
			if !ok {
				return out, fmt.Errorf("no coefficients of regime %s", r)
			}
			var err error
			if out[k], err = table(rows, doc.Features); err != nil {
				return out, err
			}
		}
		return out, nil
	}
	if m.global, err = stack(doc.PerRegime); err != nil {
		return nil, err
	}
	for k, t := range doc.PerConfig {
		if m.perConfig[k], err = stack(t); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
	}
	return m, nil
}

type moleModel struct {
	params      moleParams
	compute     []int
	memory      []int
	launchIDs   []int
	launchCoef  []float64
	experts     [5]linear
	maxNumSeqs  float64
	launchFloor float64
	noQuantiles
	noStd
}

// safeLogRatio is log(num/den) with 0/0 → −8 and clipped to ±50 (regimes._safe_log_ratio).
func safeLogRatio(num, den float64) float64 {
	num, den = math.Max(num, 0), math.Max(den, 0)
	out := math.Log(num) - math.Log(den)
	if math.IsNaN(out) {
		out = -discreteLogRatio
	}
	return math.Min(math.Max(out, -50), 50)
}

func expit(x float64) float64 { return 1.0 / (1.0 + math.Exp(-x)) }

// weights are the five blended regime weights of the step (regimes.gate_weights).
func (m *moleModel) weights(g *Aggregates, f *Features) [5]float64 {
	var lr [4]float64
	batch := math.Max(g.RunningDepth, g.PfCount+g.DcCount)
	lr[0] = safeLogRatio(batch, m.params.SaturationFraction*m.maxNumSeqs)
	if g.WaitingDepth > 0 {
		lr[0] = discreteLogRatio
	}
	lr[1] = safeLogRatio(g.KVUsageRatio, m.params.KVThreshold)
	if g.NumPreempted+g.PreemptedBefore > 0 {
		lr[1] = discreteLogRatio
	}
	compute, memory := 0.0, 0.0
	for _, id := range m.compute {
		compute += f[id]
	}
	for _, id := range m.memory {
		memory += f[id]
	}
	launchFloor := m.launchFloor
	if len(m.launchIDs) > 0 {
		launchFloor = 0
		for i, id := range m.launchIDs {
			launchFloor += m.launchCoef[i] * f[id]
		}
	}
	lr[2] = safeLogRatio(launchFloor, math.Max(compute, memory))
	lr[3] = safeLogRatio(compute, memory)
	var w [5]float64
	remaining := 1.0
	for k := 0; k < 4; k++ {
		var member float64
		if m.params.GateWidth > 0 {
			member = expit(lr[k] / m.params.GateWidth)
		} else {
			member = indicator(lr[k] > 0)
		}
		w[k] = remaining * member
		remaining = remaining * (1.0 - member)
	}
	w[4] = remaining
	total := 0.0
	for k := range w {
		if w[k] < minRegimeWeight {
			w[k] = 0
		}
		total += w[k]
	}
	for k := range w {
		w[k] /= total
	}
	return w
}

func (m *moleModel) predict(g *Aggregates, f *Features) float64 {
	w := m.weights(g, f)
	out := 0.0
	for k := range w {
		out += w[k] * m.experts[k].eval(f)
	}
	return out
}

func (m *molerd) resolve(key string, consts map[string]float64, _ hostScaling) (familyModel, bool, error) {
	experts, ok := m.perConfig[key]
	if !ok {
		experts = m.global
	}
	return &moleModel{params: m.params, compute: m.compute, memory: m.memory, experts: experts,
		launchIDs: m.launchIDs, launchCoef: m.launchCoef,
		maxNumSeqs:  consts["max_num_seqs"],
		launchFloor: m.params.LaunchFloorUs + m.params.LaunchUsPerLayer*consts["arch_layers"],
	}, ok, nil
}

// -- BSR-ARD --------------------------------------------------------------------------------

type posterior struct {
	mean    linear
	covered []int     // feature IDs the covariance covers
	cov     []float64 // row-major len(covered)²
}

type bsrard struct {
	noise     float64
	features  []string
	global    posterior
	perConfig map[string]posterior
}

func square(rows [][]float64, n int) ([]float64, error) {
	if len(rows) != n {
		return nil, fmt.Errorf("covariance has %d rows, expected %d", len(rows), n)
	}
	out := make([]float64, 0, n*n)
	for _, r := range rows {
		if len(r) != n {
			return nil, fmt.Errorf("covariance row has %d columns, expected %d", len(r), n)
		}
		out = append(out, r...)
	}
	return out, nil
}

func parseBSRARD(raw json.RawMessage) (family, error) {
	var doc struct {
		Features   []string    `json:"features"`
		Selected   []string    `json:"selected"`
		Unseen     []string    `json:"unseen"`
		Global     []coefRow   `json:"global"`
		Noise      valueUnit   `json:"noise_precision"`
		Covariance [][]float64 `json:"covariance"`
		PerConfig  map[string]struct {
			Coefficients []coefRow   `json:"coefficients"`
			Covariance   [][]float64 `json:"covariance"`
		} `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	m := &bsrard{noise: doc.Noise.Value, features: doc.Features, perConfig: map[string]posterior{}}
	if !(m.noise > 0) {
		return nil, fmt.Errorf("noise precision must be > 0")
	}
	var err error
	if m.global.mean, err = table(doc.Global, doc.Features); err != nil {
		return nil, err
	}
	selected := map[string]bool{}
	for _, n := range doc.Selected {
		selected[n] = true
	}
	free := map[string]bool{}
	for _, n := range doc.Unseen {
		free[n] = true
	}
	var selNames, cfgNames []string // in feature order (the Python masks)
	for _, n := range doc.Features {
		if selected[n] {
			selNames = append(selNames, n)
		}
		if selected[n] || free[n] {
			cfgNames = append(cfgNames, n)
		}
	}
	if m.global.covered, err = ids(selNames); err != nil {
		return nil, err
	}
	if m.global.cov, err = square(doc.Covariance, len(selNames)); err != nil {
		return nil, err
	}
	cfgIDs, err := ids(cfgNames)
	if err != nil {
		return nil, err
	}
	for k, pc := range doc.PerConfig {
		p := posterior{covered: cfgIDs}
		if p.mean, err = table(pc.Coefficients, doc.Features); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
		if p.cov, err = square(pc.Covariance, len(cfgIDs)); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
		m.perConfig[k] = p
	}
	return m, nil
}

// quadratic is xᵀΣx over the covered features.
func (p *posterior) quadratic(f *Features) float64 {
	n := len(p.covered)
	quad := 0.0
	for i := 0; i < n; i++ {
		row := 0.0
		for j := 0; j < n; j++ {
			row += p.cov[i*n+j] * f[p.covered[j]]
		}
		quad += f[p.covered[i]] * row
	}
	return quad
}

// predictiveStd is √(ŷ²/λ + xᵀΣx), µs (ard.predictive_std).
func predictiveStd(pred, noise float64, p *posterior, f *Features) float64 {
	return math.Sqrt(pred*pred/noise + math.Max(p.quadratic(f), 0))
}

type bsrModel struct {
	post  posterior
	noise float64
	noQuantiles
}

func (m *bsrModel) predict(_ *Aggregates, f *Features) float64 { return m.post.mean.eval(f) }

func (m *bsrModel) std(_ Aggregates, f Features) (float64, bool) {
	return predictiveStd(m.post.mean.eval(&f), m.noise, &m.post, &f), true
}

func (m *bsrard) resolve(key string, _ map[string]float64, host hostScaling) (familyModel, bool, error) {
	p, ok := m.perConfig[key]
	if !ok {
		p = m.global
		if host.applies() {
			p = m.hostScaled(host)
		}
	}
	return &bsrModel{post: p, noise: m.noise}, ok, nil
}

// hostScaled is the pooled posterior with its host-time entries × the factor: mean
// D·μ and covariance D·Σ·D with D = diag(factor on the host terms, 1 elsewhere).
func (m *bsrard) hostScaled(host hostScaling) posterior {
	out := posterior{mean: m.global.mean.hostScaled(m.features, host),
		covered: m.global.covered, cov: make([]float64, len(m.global.cov))}
	n := len(out.covered)
	d := make([]float64, n)
	for i, id := range out.covered {
		d[i] = host.of(FeatureNames[id])
	}
	for i := 0; i < n; i++ {
		for j := 0; j < n; j++ {
			out.cov[i*n+j] = m.global.cov[i*n+j] * (d[i] * d[j])
		}
	}
	return out
}

// -- Hybrid ---------------------------------------------------------------------------------

type hybrid struct {
	base      posterior
	noise     float64
	levels    []float64
	quantiles []linear
	residual  []string
	perConfig map[string]hybridTerms
}

type hybridTerms struct {
	scale    float64
	residual linear
}

func parseHybrid(raw json.RawMessage) (family, error) {
	var doc struct {
		Params struct {
			Residual  []string  `json:"residual_features"`
			Quantiles []float64 `json:"quantiles"`
		} `json:"params"`
		Features   []string             `json:"features"`
		Selected   []string             `json:"selected"`
		Base       []coefRow            `json:"base"`
		Covariance [][]float64          `json:"covariance"`
		Noise      valueUnit            `json:"noise_precision"`
		Quantiles  map[string][]coefRow `json:"quantiles"`
		PerConfig  map[string]struct {
			Scale    valueUnit `json:"scale"`
			Residual []coefRow `json:"residual"`
		} `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	m := &hybrid{noise: doc.Noise.Value, residual: doc.Params.Residual,
		levels: doc.Params.Quantiles, perConfig: map[string]hybridTerms{}}
	if !(m.noise > 0) {
		return nil, fmt.Errorf("noise precision must be > 0")
	}
	var err error
	if m.base.mean, err = table(doc.Base, doc.Features); err != nil {
		return nil, err
	}
	if m.base.covered, err = ids(doc.Selected); err != nil {
		return nil, err
	}
	if m.base.cov, err = square(doc.Covariance, len(doc.Selected)); err != nil {
		return nil, err
	}
	for _, q := range m.levels {
		rows, ok := doc.Quantiles[quantileKey(q)]
		if !ok {
			return nil, fmt.Errorf("no coefficients of quantile %s", quantileKey(q))
		}
		l, err := table(rows, doc.Features)
		if err != nil {
			return nil, fmt.Errorf("quantile %s: %w", quantileKey(q), err)
		}
		m.quantiles = append(m.quantiles, l)
	}
	for k, pc := range doc.PerConfig {
		t := hybridTerms{scale: pc.Scale.Value}
		if t.residual, err = table(pc.Residual, m.residual); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
		m.perConfig[k] = t
	}
	return m, nil
}

type hybridModel struct {
	*hybrid
	known bool
	terms hybridTerms
}

func (m *hybridModel) apply(base float64, f *Features) float64 {
	if !m.known {
		return base
	}
	return m.terms.scale*base + m.terms.residual.eval(f)
}

func (m *hybridModel) predict(_ *Aggregates, f *Features) float64 {
	return m.apply(m.base.mean.eval(f), f)
}

func (m *hybridModel) quantile(_ Aggregates, f Features, q float64) (float64, error) {
	i, err := matchLevel(m.hybrid.levels, q)
	if err != nil {
		return 0, err
	}
	return m.apply(m.quantiles[i].eval(&f), &f), nil
}

func (m *hybridModel) std(_ Aggregates, f Features) (float64, bool) {
	std := predictiveStd(m.base.mean.eval(&f), m.noise, &m.base, &f)
	if m.known {
		std *= m.terms.scale
	}
	return std, true
}

func (m *hybridModel) levels() []float64 { return m.hybrid.levels }

func (m *hybrid) resolve(key string, _ map[string]float64, _ hostScaling) (familyModel, bool, error) {
	t, ok := m.perConfig[key]
	return &hybridModel{hybrid: m, known: ok, terms: t}, ok, nil
}

// -- RECE -----------------------------------------------------------------------------------

const maxLevels = 16

type receSpecialist struct {
	embedding []float64
	sets      []linear // per quantile level
}

type rece struct {
	levels       []float64
	global       []linear
	columns      []string
	center       []float64
	scale        []float64
	nNeighbors   int
	bandwidth    float64
	globalWeight float64
	specialists  map[string]receSpecialist
}

func parseRECE(raw json.RawMessage) (family, error) {
	var doc struct {
		Params struct {
			NNeighbors   int     `json:"n_neighbors"`
			Bandwidth    float64 `json:"bandwidth"`
			GlobalWeight float64 `json:"global_weight"`
		} `json:"params"`
		Features  []string             `json:"features"`
		Quantiles []float64            `json:"quantiles"`
		Global    map[string][]coefRow `json:"global"`
		Embedding struct {
			Columns []string  `json:"columns"`
			Center  []float64 `json:"center"`
			Scale   []float64 `json:"scale"`
		} `json:"embedding"`
		PerConfig map[string]struct {
			Embedding []float64            `json:"embedding"`
			Quantiles map[string][]coefRow `json:"quantiles"`
		} `json:"per_config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	if len(doc.Quantiles) == 0 || len(doc.Quantiles) > maxLevels {
		return nil, fmt.Errorf("needs 1..%d quantile levels, got %d", maxLevels, len(doc.Quantiles))
	}
	e := doc.Embedding
	if len(e.Center) != len(e.Columns) || len(e.Scale) != len(e.Columns) {
		return nil, fmt.Errorf("embedding center/scale do not match its columns")
	}
	m := &rece{levels: doc.Quantiles, columns: e.Columns, center: e.Center, scale: e.Scale,
		nNeighbors: doc.Params.NNeighbors, bandwidth: doc.Params.Bandwidth,
		globalWeight: doc.Params.GlobalWeight, specialists: map[string]receSpecialist{}}
	stack := func(tables map[string][]coefRow) ([]linear, error) {
		out := make([]linear, len(m.levels))
		for i, q := range m.levels {
			rows, ok := tables[quantileKey(q)]
			if !ok {
				return nil, fmt.Errorf("no coefficients of quantile %s", quantileKey(q))
			}
			var err error
			if out[i], err = table(rows, doc.Features); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	var err error
	if m.global, err = stack(doc.Global); err != nil {
		return nil, err
	}
	for k, pc := range doc.PerConfig {
		if len(pc.Embedding) != len(m.columns) {
			return nil, fmt.Errorf("per_config %s: embedding length %d, expected %d", k,
				len(pc.Embedding), len(m.columns))
		}
		s := receSpecialist{embedding: pc.Embedding}
		if s.sets, err = stack(pc.Quantiles); err != nil {
			return nil, fmt.Errorf("per_config %s: %w", k, err)
		}
		m.specialists[k] = s
	}
	return m, nil
}

// embed is the standardised configuration embedding (log(1 + v) − center) / scale.
func (m *rece) embed(consts map[string]float64) ([]float64, error) {
	out := make([]float64, len(m.columns))
	for i, c := range m.columns {
		v, ok := consts[c]
		if !ok {
			return nil, fmt.Errorf("embedding column %q is unknown to the Go evaluator", c)
		}
		out[i] = (math.Log1p(math.Max(v, 0)) - m.center[i]) / m.scale[i]
	}
	return out, nil
}

// blend is RECE's specialist ensemble for an unseen configuration: the n nearest
// specialists weighted by exp(−d²/2h²), mixed with the global set (global_weight).
func (m *rece) blend(emb []float64) []linear {
	keys := make([]string, 0, len(m.specialists))
	for k := range m.specialists {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	d := make([]float64, len(keys))
	for i, k := range keys {
		sq := 0.0
		for j, v := range m.specialists[k].embedding {
			diff := emb[j] - v
			sq += diff * diff
		}
		d[i] = math.Sqrt(sq)
	}
	order := make([]int, len(keys))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return d[order[a]] < d[order[b]] })
	n := m.nNeighbors
	if n < 1 {
		n = 1
	}
	if n > len(order) {
		n = len(order)
	}
	nearest := order[:n]
	bw := math.Max(m.bandwidth, 1e-12)
	logits := make([]float64, n)
	top := math.Inf(-1)
	for i, idx := range nearest {
		z := d[idx] / bw
		logits[i] = -0.5 * (z * z)
		top = math.Max(top, logits[i])
	}
	w := make([]float64, n)
	total := 0.0
	for i := range logits {
		w[i] = math.Exp(logits[i] - top)
		total += w[i]
	}
	out := make([]linear, len(m.levels))
	for q := range m.levels {
		p := len(m.global[q].coef)
		blend := make([]float64, p)
		for i, idx := range nearest {
			wi := w[i] / total
			spec := m.specialists[keys[idx]].sets[q].coef
			for k := 0; k < p; k++ {
				blend[k] += wi * spec[k]
			}
		}
		coef := make([]float64, p)
		for k := 0; k < p; k++ {
			coef[k] = (1.0-m.globalWeight)*blend[k] + m.globalWeight*m.global[q].coef[k]
		}
		out[q] = linear{ids: m.global[q].ids, coef: coef}
	}
	return out
}

type receModel struct {
	levelsQ []float64
	sets    []linear
	order   []int // level indices by increasing level
	median  int   // level predict returns
	noStd
}

func (m *receModel) all(f *Features, out *[maxLevels]float64) {
	for i := range m.sets {
		out[i] = m.sets[i].eval(f)
	}
	// non-crossing levels: running maximum along increasing levels (rearrangement)
	for j := 1; j < len(m.order); j++ {
		if prev := out[m.order[j-1]]; prev > out[m.order[j]] {
			out[m.order[j]] = prev
		}
	}
}

func (m *receModel) predict(_ *Aggregates, f *Features) float64 {
	var out [maxLevels]float64
	m.all(f, &out)
	return out[m.median]
}

func (m *receModel) quantile(_ Aggregates, f Features, q float64) (float64, error) {
	i, err := matchLevel(m.levelsQ, q)
	if err != nil {
		return 0, err
	}
	var out [maxLevels]float64
	m.all(&f, &out)
	return out[i], nil
}

func (m *receModel) levels() []float64 { return m.levelsQ }

func (m *rece) resolve(key string, consts map[string]float64, _ hostScaling) (familyModel, bool, error) {
	model := &receModel{levelsQ: m.levels, order: make([]int, len(m.levels))}
	for i := range model.order {
		model.order[i] = i
	}
	sort.SliceStable(model.order, func(a, b int) bool {
		return m.levels[model.order[a]] < m.levels[model.order[b]]
	})
	model.median = model.order[0]
	if i, err := matchLevel(m.levels, 0.5); err == nil {
		model.median = i
	}
	s, known := m.specialists[key]
	switch {
	case known:
		model.sets = s.sets
	case len(m.specialists) == 0:
		model.sets = m.global
	default:
		emb, err := m.embed(consts)
		if err != nil {
			return nil, false, err
		}
		model.sets = m.blend(emb)
	}
	return model, known, nil
}
