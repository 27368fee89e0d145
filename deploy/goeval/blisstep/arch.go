package blisstep

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
)

// Arch is a transformer's shape, read from a HuggingFace config.json. It mirrors
// blis_model/architecture.py (ModelArch, arch_from_hf_config): real head_dim, expert
// counts, quantized weight bytes.
type Arch struct {
	ModelID                      string
	NumLayers                    int
	HiddenSize                   int
	NumHeads                     int
	NumKVHeads                   int
	HeadDim                      int
	IntermediateSize             int // dense FFN width
	VocabSize                    int
	NumExperts                   int // 0 for dense models
	ExpertsPerToken              int
	MoEIntermediateSize          int // per-expert FFN width
	SharedExpertIntermediateSize int
	NumMoELayers                 int
	WeightBytesPerParam          float64 // 2 bf16/fp16, 1 fp8/int8, 0.5 4-bit
	Quantization                 string  // "" = none (bf16)
}

// NumDenseLayers is the number of layers without experts.
func (a Arch) NumDenseLayers() int { return a.NumLayers - a.NumMoELayers }

// QDim is the real query width H·head_dim.
func (a Arch) QDim() int { return a.NumHeads * a.HeadDim }

// QuantizesActivations: W8A8 (FP8 / INT8) checkpoints quantize every linear layer's input
// in a kernel of its own (architecture.py: quantizes_activations).
func (a Arch) QuantizesActivations() bool { return a.WeightBytesPerParam == 1 }

// KVDim is the real K (or V) width kv_heads·head_dim.
func (a Arch) KVDim() int { return a.NumKVHeads * a.HeadDim }

// AttentionParamsPerLayer counts the Q, K, V, O projection parameters of one layer.
func (a Arch) AttentionParamsPerLayer() int {
	d := a.HiddenSize
	return d*a.QDim()*2 + d*a.KVDim()*2
}

// DenseFFNParamsPerLayer counts a dense FFN's gate, up and down parameters.
func (a Arch) DenseFFNParamsPerLayer() int { return 3 * a.HiddenSize * a.IntermediateSize }

// ExpertParams counts one routed expert's parameters.
func (a Arch) ExpertParams() int { return 3 * a.HiddenSize * a.MoEIntermediateSize }

// SharedExpertParams counts the always-on shared expert's parameters.
func (a Arch) SharedExpertParams() int { return 3 * a.HiddenSize * a.SharedExpertIntermediateSize }

var quantBytes = map[string]float64{"fp8": 1.0, "fbgemm_fp8": 1.0, "compressed-tensors": 1.0,
	"modelopt": 1.0, "int8": 1.0, "w8a8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5,
	"mxfp4": 0.5, "nvfp4": 0.5}

// truthy mirrors Python truthiness of a decoded JSON value.
func truthy(v interface{}) bool {
	switch x := v.(type) {
	case nil:
		return false
	case bool:
		return x
	case float64:
		return x != 0
	case string:
		return x != ""
	case []interface{}:
		return len(x) > 0
	case map[string]interface{}:
		return len(x) > 0
	}
	return true
}

func first(cfg map[string]interface{}, keys ...string) interface{} {
	for _, k := range keys {
		if v, ok := cfg[k]; ok && v != nil {
			return v
		}
	}
	return nil
}

func asInt(v interface{}, key string) (int, error) {
	switch x := v.(type) {
	case float64:
		return int(x), nil
	case bool:
		if x {
			return 1, nil
		}
		return 0, nil
	}
	return 0, fmt.Errorf("config key %s: expected a number, got %v", key, v)
}

func pyStr(v interface{}) string {
	switch x := v.(type) {
	case string:
		return x
	case float64:
		if x == math.Trunc(x) {
			return fmt.Sprintf("%d", int64(x))
		}
		return fmt.Sprint(x)
	}
	return fmt.Sprint(v)
}

func quantization(cfg map[string]interface{}, override string) (string, float64) {
	method := override
	if method == "" {
		qc, _ := cfg["quantization_config"].(map[string]interface{})
		if qc == nil {
			qc = map[string]interface{}{}
		}
		m := qc["quant_method"]
		if !truthy(m) {
			m = qc["format"]
		}
		bits := qc["bits"]
		if !truthy(bits) {
			bits = qc["w_bit"]
		}
		if truthy(m) && truthy(bits) {
			if b, ok := bits.(float64); ok {
				return strings.ToLower(pyStr(m)), b / 8.0
			}
		}
		if m == nil {
			dt := cfg["torch_dtype"]
			if !truthy(dt) {
				dt = cfg["dtype"]
			}
			dtype := "bfloat16"
			if truthy(dt) {
				dtype = strings.ToLower(pyStr(dt))
			}
			if strings.Contains(dtype, "float8") || strings.Contains(dtype, "fp8") {
				return "fp8", 1.0
			}
			return "", 2.0
		}
		method = pyStr(m)
	}
	method = strings.ToLower(method)
	if method == "none" || method == "null" || method == "" {
		return "", 2.0
	}
	if b, ok := quantBytes[method]; ok {
		return method, b
	}
	if strings.Contains(method, "8") {
		return method, 1.0
	}
	return method, 2.0
}

func moeLayerCount(cfg map[string]interface{}, numLayers int) (int, error) {
	if v := cfg["first_k_dense_replace"]; v != nil { // DeepSeek
		freq := 1
		if f := cfg["moe_layer_freq"]; truthy(f) {
			var err error
			if freq, err = asInt(f, "moe_layer_freq"); err != nil {
				return 0, err
			}
		}
		firstDense, err := asInt(v, "first_k_dense_replace")
		if err != nil {
			return 0, err
		}
		n := 0
		for i := firstDense; i < numLayers; i++ {
			if (i-firstDense)%freq == 0 {
				n++
			}
		}
		return n, nil
	}
	step := 1
	if v := first(cfg, "interleave_moe_layer_step", "decoder_sparse_step"); v != nil {
		s, err := asInt(v, "decoder_sparse_step")
		if err != nil {
			return 0, err
		}
		step = s
	}
	if step < 1 {
		step = 1
	}
	denseOnly := map[int]bool{}
	if list, ok := cfg["mlp_only_layers"].([]interface{}); ok {
		for _, x := range list {
			if i, err := asInt(x, "mlp_only_layers"); err == nil {
				denseOnly[i] = true
			}
		}
	}
	n := 0
	for i := 0; i < numLayers; i++ {
		if (i+1)%step == 0 && !denseOnly[i] {
			n++
		}
	}
	return n, nil
}

// ParseArch builds an Arch from the bytes of a HuggingFace config.json; quantization
// overrides the config's (as exp-config.yaml's "quantization"; "" = from the config).
func ParseArch(configJSON []byte, modelID, quant string) (Arch, error) {
	var cfg map[string]interface{}
	if err := json.Unmarshal(configJSON, &cfg); err != nil {
		return Arch{}, fmt.Errorf("model config: not valid JSON: %w", err)
	}
	return ArchFromConfig(cfg, modelID, quant)
}

// ArchFromConfig builds an Arch from a decoded config.json (text_config is honoured).
func ArchFromConfig(cfg map[string]interface{}, modelID, quant string) (Arch, error) {
	if tc, ok := cfg["text_config"].(map[string]interface{}); ok {
		merged := map[string]interface{}{}
		for k, v := range cfg {
			merged[k] = v
		}
		for k, v := range tc {
			merged[k] = v
		}
		cfg = merged
	}
	if modelID == "" {
		modelID = pyStr(first(cfg, "_name_or_path", "model_type"))
	}
	need := func(keys ...string) (int, error) {
		v := first(cfg, keys...)
		if v == nil {
			return 0, fmt.Errorf("model config of %s: missing %s", modelID, keys[0])
		}
		return asInt(v, keys[0])
	}
	orDefault := func(def int, keys ...string) (int, error) { // Python _first(..., default=)
		v := first(cfg, keys...)
		if v == nil {
			return def, nil
		}
		return asInt(v, keys[0])
	}
	optional := func(def int, keys ...string) (int, error) { // _first(...) or default
		v := first(cfg, keys...)
		if !truthy(v) {
			return def, nil
		}
		return asInt(v, keys[0])
	}
	var err error
	a := Arch{ModelID: modelID}
	if a.NumLayers, err = need("num_hidden_layers", "n_layer", "num_layers"); err != nil {
		return a, err
	}
	if a.HiddenSize, err = need("hidden_size", "n_embd", "d_model"); err != nil {
		return a, err
	}
	if a.NumHeads, err = need("num_attention_heads", "n_head"); err != nil {
		return a, err
	}
	if a.NumKVHeads, err = orDefault(a.NumHeads, "num_key_value_heads", "num_kv_heads"); err != nil {
		return a, err
	}
	if a.NumHeads <= 0 || a.HiddenSize <= 0 {
		return a, fmt.Errorf("model config of %s: heads and hidden size must be > 0", modelID)
	}
	if a.HeadDim, err = orDefault(a.HiddenSize/a.NumHeads, "head_dim"); err != nil {
		return a, err
	}
	if a.NumExperts, err = optional(0, "num_local_experts", "n_routed_experts", "num_experts"); err != nil {
		return a, err
	}
	a.Quantization, a.WeightBytesPerParam = quantization(cfg, quant)
	if a.NumExperts != 0 {
		if a.ExpertsPerToken, err = need("num_experts_per_tok", "experts_per_token", "moe_topk"); err != nil {
			return a, err
		}
		if a.MoEIntermediateSize, err = optional(0, "moe_intermediate_size"); err != nil {
			return a, err
		}
		if a.MoEIntermediateSize == 0 {
			if a.MoEIntermediateSize, err = need("intermediate_size"); err != nil {
				return a, err
			}
		}
		if a.NumMoELayers, err = moeLayerCount(cfg, a.NumLayers); err != nil {
			return a, err
		}
		if v := first(cfg, "intermediate_size_mlp", "intermediate_size"); v != nil {
			if a.IntermediateSize, err = asInt(v, "intermediate_size"); err != nil {
				return a, err
			}
		}
		if a.NumMoELayers == a.NumLayers {
			if a.IntermediateSize, err = optional(a.IntermediateSize, "intermediate_size_mlp"); err != nil {
				return a, err
			}
		}
		if a.SharedExpertIntermediateSize, err = optional(0, "shared_expert_intermediate_size"); err != nil {
			return a, err
		}
		if a.SharedExpertIntermediateSize == 0 && truthy(cfg["n_shared_experts"]) {
			n, err := asInt(cfg["n_shared_experts"], "n_shared_experts")
			if err != nil {
				return a, err
			}
			a.SharedExpertIntermediateSize = n * a.MoEIntermediateSize
		}
	} else if a.IntermediateSize, err = need("intermediate_size", "n_inner", "ffn_dim"); err != nil {
		return a, err
	}
	if a.VocabSize, err = need("vocab_size"); err != nil {
		return a, err
	}
	return a, a.validate()
}

func (a Arch) validate() error {
	if a.NumLayers <= 0 || a.HiddenSize <= 0 || a.NumHeads <= 0 || a.NumKVHeads <= 0 ||
		a.HeadDim <= 0 || a.VocabSize <= 0 {
		return fmt.Errorf("model %s: layers, hidden, heads, kv heads, head_dim and vocab must be > 0", a.ModelID)
	}
	if a.NumExperts != 0 && (a.ExpertsPerToken == 0 || a.MoEIntermediateSize == 0) {
		return fmt.Errorf("model %s: MoE model needs experts_per_token and expert FFN size", a.ModelID)
	}
	if a.NumMoELayers < 0 || a.NumMoELayers > a.NumLayers {
		return fmt.Errorf("model %s: num_moe_layers out of range", a.ModelID)
	}
	if a.NumDenseLayers() > 0 && a.IntermediateSize <= 0 {
		return fmt.Errorf("model %s: dense layers need intermediate_size", a.ModelID)
	}
	return nil
}
