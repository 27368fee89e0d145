package blisstep

import (
	"fmt"
	"math"
)

// Feature IDs: every feature of blis_model's registry (features/physics.py and
// features/candidates.py). Each is a pure function of the step aggregates and the
// deployment (model shape, GPU, TP); "_us" features are µs, the others counts.
const (
	fGemmCompute = iota
	fWeightRead
	fPrefillAttention
	fDecodeAttention
	fMixedDecodeAttention
	fDecodeAttentionTail
	fPrefillAttentionTail
	fLMHead
	fActivationIO
	fTPAllreduce
	fLayerOverhead
	fMoELayerOverhead
	fRequestOverhead
	fStepOverhead
	fTPComm
	fCPUOffload
	fMoEDispatch
	fPrefillAttentionFullPrompt
	fDecodeAttentionCompute
	fDecodeCtxMax
	fPrefillKVWrite
	fKVUsage
	fKVPressure
	fPreemptions
	fRecomputedRequests
	fQueueWaiting
	fPrefillRequests
	fDecodeRequests
	fSampledSequences
	fKVBlocks
	fTokenOverhead
	fPrefillStep
	fGemmRoofline
	fGemmRidge
	fLayerKernels
	fActivationQuant
	numFeatures
)

// FeatureNames are the registry names, indexed by feature ID.
var FeatureNames = [numFeatures]string{
	"gemm_compute_us", "weight_read_us", "prefill_attention_us", "decode_attention_us",
	"mixed_decode_attention_us", "decode_attention_tail_us", "prefill_attention_tail_us",
	"lm_head_us", "activation_io_us", "tp_allreduce_us", "layer_overhead",
	"moe_layer_overhead", "request_overhead", "step_overhead", "tp_comm_us",
	"cpu_offload_us", "moe_dispatch_us", "prefill_attention_full_prompt_us",
	"decode_attention_compute_us", "decode_ctx_max_us", "prefill_kv_write_us", "kv_usage",
	"kv_pressure", "preemptions", "recomputed_requests", "queue_waiting", "prefill_requests",
	"decode_requests", "sampled_sequences", "kv_blocks", "token_overhead", "prefill_step",
	"gemm_roofline_us", "gemm_ridge_us", "layer_kernels", "activation_quant_us",
}

// correction features are physical µs estimates (prior coefficient 1); the rest are
// counts (overheads, prior 0).
var isCorrection = [numFeatures]bool{
	fGemmCompute: true, fWeightRead: true, fPrefillAttention: true, fDecodeAttention: true,
	fMixedDecodeAttention: true, fDecodeAttentionTail: true, fPrefillAttentionTail: true,
	fLMHead: true, fActivationIO: true, fTPAllreduce: true, fTPComm: true, fCPUOffload: true,
	fMoEDispatch: true, fPrefillAttentionFullPrompt: true, fDecodeAttentionCompute: true,
	fDecodeCtxMax: true, fPrefillKVWrite: true, fGemmRoofline: true, fGemmRidge: true,
	fActivationQuant: true,
}

var featureIDs = func() map[string]int {
	m := make(map[string]int, numFeatures)
	for i, n := range FeatureNames {
		m[n] = i
	}
	return m
}()

func featureID(name string) (int, error) {
	if id, ok := featureIDs[name]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("feature %q is not implemented by the Go evaluator "+
		"(regenerate the golden vectors and implement it in features.go)", name)
}

// Features is one step's feature vector, indexed by feature ID.
type Features [numFeatures]float64

const (
	activationBytes     = 2.0  // bf16 activations
	kvBytesPerElement   = 2.0  // bf16 KV cache
	blockSize           = 16.0 // vLLM KV block size, tokens
	kvPressureThreshold = 0.9
	attentionQueryTile  = 128.0
)

// featureContext holds the deployment constants of the features, each computed in the
// same order of operations as the Python library (so results agree to rounding).
type featureContext struct {
	arch Arch
	hw   Hardware
	tp   int

	layers, moeLayers, experts, topK float64
	peak, hbm, ic, pcie, bf16Peak    float64
	gemmParamsPerToken               float64
	weightParamsFixed                float64 // attention + dense FFN params (all layers)
	expertParams, sharedParams       float64
	weightScale                      float64 // wbpp (bytes/param)
	prefillAttnScale                 float64 // 4·L·(H/TP)·head_dim
	decodeAttnScale                  float64 // L·2·(kv_dim/TP)·2 bytes
	gqaExtra                         float64 // H/kv_heads − 1
	tailBytesPerKey, tailPerSM       float64
	prefillTailPerSM                 float64
	lmHeadScale                      float64 // 2·d·V/TP
	activationPerToken               float64
	allreduceScale                   float64
	tpCommScale                      float64
	kvBytesPerToken                  float64
	moeDispatchScale                 float64
	tpLinkShare                      float64 // (TP−1)/TP
	hidden                           float64
	denseParams, routedParams        float64 // per GPU: dense weights, one expert × MoE layers
	layerKernels                     float64
	quantPerToken                    float64 // W8A8: GEMM-input elements quantized per token
}

// Kernel launches of a decoder layer (physics.py: DENSE_LAYER_KERNELS, ...).
const (
	denseLayerKernels   = 10
	moeLayerKernels     = 14
	sharedExpertKernels = 3
	tpLayerKernels      = 2
	quantLayerKernels   = 4   // W8A8: QKV, O, gate_up and down inputs quantized apart
	quantBytesPerElem   = 3.0 // read bf16 (2) + write the 1-byte copy (1)
)

func newFeatureContext(a Arch, hw Hardware, tp int) featureContext {
	c := featureContext{arch: a, hw: hw, tp: tp}
	tpf := float64(tp)
	c.layers = float64(a.NumLayers)
	c.moeLayers = float64(a.NumMoELayers)
	c.experts = float64(a.NumExperts)
	c.topK = float64(a.ExpertsPerToken)
	c.hidden = float64(a.HiddenSize)
	c.peak = hw.PeakFlopsPerUs(a.WeightBytesPerParam)
	c.hbm = hw.HBMBytesPerUs()
	c.ic = hw.InterconnectBytesPerUs()
	c.pcie = hw.PCIeBytesPerUs()
	c.bf16Peak = hw.TFlopsBF16 * 1e6
	fixed := a.NumLayers*a.AttentionParamsPerLayer() + a.NumDenseLayers()*a.DenseFFNParamsPerLayer()
	perToken := fixed + a.NumMoELayers*(a.ExpertsPerToken*a.ExpertParams()+a.SharedExpertParams())
	c.gemmParamsPerToken = float64(perToken) / tpf
	c.weightParamsFixed = float64(fixed)
	c.expertParams = float64(a.ExpertParams())
	c.sharedParams = float64(a.SharedExpertParams())
	c.weightScale = a.WeightBytesPerParam
	c.prefillAttnScale = 4.0 * c.layers * (float64(a.NumHeads) / tpf) * float64(a.HeadDim)
	c.decodeAttnScale = c.layers * 2.0 * (float64(a.KVDim()) / tpf) * kvBytesPerElement
	c.gqaExtra = float64(a.NumHeads)/float64(a.NumKVHeads) - 1.0
	c.tailPerSM = c.hbm / float64(hw.SMCount)
	c.tailBytesPerKey = 2.0 * float64(a.HeadDim) * kvBytesPerElement
	c.prefillTailPerSM = hw.TFlopsBF16 * 1e6 / float64(hw.SMCount)
	c.lmHeadScale = 2.0 * c.hidden * float64(a.VocabSize) / tpf
	ffn := a.NumDenseLayers()*a.IntermediateSize + a.NumMoELayers*(a.ExpertsPerToken*
		a.MoEIntermediateSize+a.SharedExpertIntermediateSize+2*a.ExpertsPerToken*a.HiddenSize)
	c.activationPerToken = float64(a.NumLayers*(12*a.HiddenSize+4*a.QDim()+2*a.KVDim())+3*ffn) / tpf
	c.allreduceScale = float64(2*a.NumLayers) * 2.0 * float64(tp-1) / tpf
	c.tpCommScale = float64(2 * a.NumLayers * (tp - 1))
	c.kvBytesPerToken = c.layers * 2.0 * (float64(a.KVDim()) / tpf) * kvBytesPerElement
	c.moeDispatchScale = 2.0 * c.moeLayers
	c.tpLinkShare = float64(tp-1) / tpf
	c.denseParams = float64(a.NumLayers*a.AttentionParamsPerLayer()+
		a.NumDenseLayers()*a.DenseFFNParamsPerLayer()+a.NumMoELayers*a.SharedExpertParams()) / tpf
	c.routedParams = float64(a.NumMoELayers*a.ExpertParams()) / tpf
	moe := moeLayerKernels
	if a.SharedExpertParams() > 0 {
		moe += sharedExpertKernels
	}
	kernels := a.NumDenseLayers()*denseLayerKernels + a.NumMoELayers*moe
	if tp > 1 {
		kernels += a.NumLayers * tpLayerKernels
	}
	if a.QuantizesActivations() {
		kernels += a.NumLayers * quantLayerKernels
		d := c.hidden
		experts := c.topK * (d + float64(a.MoEIntermediateSize)/tpf)
		shared := 0.0
		if a.SharedExpertParams() > 0 {
			shared = d + float64(a.SharedExpertIntermediateSize)/tpf
		}
		c.quantPerToken = c.layers*(d+float64(a.QDim())/tpf) +
			float64(a.NumDenseLayers())*(d+float64(a.IntermediateSize)/tpf) +
			c.moeLayers*(experts+shared)
	}
	c.layerKernels = float64(kernels)
	return c
}

func clip0(x float64) float64 {
	if x < 0 {
		return 0
	}
	return x
}

func indicator(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// compute fills f with every feature of the step (see physics.py, candidates.py).
func (c *featureContext) compute(g *Aggregates, f *Features) {
	tokens := g.PfTokens + g.DcCount
	// expected distinct experts E·(1 − (1 − k/E)^N)
	activeExperts := 0.0
	if c.arch.NumExperts > 0 {
		activeExperts = c.experts * (1.0 - math.Pow(1.0-float64(c.arch.ExpertsPerToken)/c.experts, tokens))
	}
	f[fGemmCompute] = 2.0 * tokens * c.gemmParamsPerToken / c.peak
	params := c.weightParamsFixed + c.moeLayers*(activeExperts*c.expertParams+c.sharedParams)
	f[fWeightRead] = params * c.weightScale / float64(c.tp) / c.hbm
	f[fPrefillAttention] = c.prefillAttnScale * (g.PfCtxTokens + 0.5*g.PfTokensSq) / c.bf16Peak
	decodeAttn := c.decodeAttnScale * (g.DcCtxSum + g.DcCount) / c.hbm
	f[fDecodeAttention] = decodeAttn
	f[fMixedDecodeAttention] = decodeAttn * c.gqaExtra * indicator(g.PfTokens > 0)
	f[fDecodeAttentionTail] = c.layers * g.DcCtxMax * c.tailBytesPerKey / c.tailPerSM
	rows := math.Min(g.PfTokens, attentionQueryTile)
	f[fPrefillAttentionTail] = c.layers * rows * g.PfCtxMax * 4.0 * float64(c.arch.HeadDim) / c.prefillTailPerSM
	sampling := g.DcCount + g.PfSampling
	f[fLMHead] = c.lmHeadScale * sampling / c.peak
	f[fActivationIO] = tokens * c.activationPerToken * activationBytes / c.hbm
	if c.tp <= 1 {
		f[fTPAllreduce] = 0
	} else {
		f[fTPAllreduce] = c.allreduceScale * tokens * c.hidden * activationBytes / c.ic
	}
	f[fLayerOverhead] = c.layers
	f[fMoELayerOverhead] = c.moeLayers
	f[fRequestOverhead] = g.PfCount + g.DcCount
	f[fStepOverhead] = 1
	// candidates.py
	f[fTPComm] = c.tpCommScale * tokens * c.hidden * activationBytes / c.ic
	batch := math.Max(g.PfCount+g.DcCount, 1.0)
	swapped := g.NumPreempted * g.BlocksAllocated / batch
	blocks := tokens/blockSize + swapped
	f[fCPUOffload] = blocks * blockSize * c.kvBytesPerToken / c.pcie
	if c.arch.NumMoELayers == 0 {
		f[fMoEDispatch] = 0
	} else {
		bytes := c.moeDispatchScale * tokens * c.topK * c.hidden * activationBytes
		f[fMoEDispatch] = bytes/c.hbm + c.tpLinkShare*bytes/c.ic
	}
	f[fPrefillAttentionFullPrompt] = c.prefillAttnScale * (g.PfPromptTokens + 0.5*g.PfTokensSq) / c.bf16Peak
	f[fDecodeAttentionCompute] = c.prefillAttnScale * (g.DcCtxSum + g.DcCount) / c.bf16Peak
	f[fDecodeCtxMax] = g.DcCtxMax * c.kvBytesPerToken / c.hbm
	f[fPrefillKVWrite] = g.PfTokens * c.kvBytesPerToken / c.hbm
	f[fKVUsage] = clip0(g.KVUsageRatio)
	f[fKVPressure] = clip0(g.KVUsageRatio-kvPressureThreshold) / (1.0 - kvPressureThreshold)
	f[fPreemptions] = clip0(g.NumPreempted)
	f[fRecomputedRequests] = clip0(g.PreemptedBefore)
	f[fQueueWaiting] = clip0(g.WaitingDepth)
	f[fPrefillRequests] = g.PfCount
	f[fDecodeRequests] = g.DcCount
	f[fSampledSequences] = g.DcCount + g.PfSampling
	f[fKVBlocks] = clip0(g.BlocksAllocated)
	f[fTokenOverhead] = tokens
	f[fPrefillStep] = indicator(g.PfTokens > 0)
	// roofline of the layers' GEMMs: per intensity group, max / min of compute and read
	denseCompute := 2.0 * tokens * c.denseParams / c.peak
	denseRead := 0.0
	if tokens > 0 {
		denseRead = c.denseParams * c.weightScale / c.hbm
	}
	f[fGemmRoofline] = math.Max(denseCompute, denseRead)
	f[fGemmRidge] = math.Min(denseCompute, denseRead)
	if c.arch.NumMoELayers > 0 {
		expertCompute := 2.0 * tokens * c.topK * c.routedParams / c.peak
		expertRead := activeExperts * c.routedParams * c.weightScale / c.hbm
		f[fGemmRoofline] += math.Max(expertCompute, expertRead)
		f[fGemmRidge] += math.Min(expertCompute, expertRead)
	}
	f[fLayerKernels] = c.layerKernels
	f[fActivationQuant] = tokens * c.quantPerToken * quantBytesPerElem / c.hbm
}

// constants are the per-deployment numbers of dataset.experiment_constants (RECE's
// configuration embedding, MoLE-RD's regime rules).
func (c *featureContext) constants(maxNumBatchedTokens, maxNumSeqs int) map[string]float64 {
	a := c.arch
	return map[string]float64{
		"tp":                     float64(c.tp),
		"max_num_batched_tokens": float64(maxNumBatchedTokens),
		"max_num_seqs":           float64(maxNumSeqs),
		"hw_tflops":              c.hw.PeakFlopsPerUs(a.WeightBytesPerParam) / 1e6,
		"hw_hbm_tbs":             c.hw.HBMTBs,
		"hw_interconnect_gbs":    c.hw.InterconnectGBs,
		"arch_layers":            float64(a.NumLayers),
		"arch_hidden":            float64(a.HiddenSize),
		"arch_gqa_ratio":         float64(a.NumHeads) / float64(a.NumKVHeads),
		"arch_experts":           float64(a.NumExperts),
		"arch_top_k":             float64(a.ExpertsPerToken),
		"arch_weight_bytes":      a.WeightBytesPerParam,
	}
}
