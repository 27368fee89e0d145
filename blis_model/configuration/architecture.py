"""Model architecture constants, read from a HuggingFace ``config.json``.

Two views are kept on purpose: the *real* shapes (explicit ``head_dim``, quantized
weight bytes, expert counts) used by our physics features, and BLIS's simplifications
(``d_h = d / H``, weight bytes 1 or 2) used by the parity basis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from blis_model.errors import ConfigError

_QUANT_BYTES = {"fp8": 1.0, "fbgemm_fp8": 1.0, "compressed-tensors": 1.0, "modelopt": 1.0,
                "int8": 1.0, "w8a8": 1.0, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5,
                "mxfp4": 0.5, "nvfp4": 0.5}


@dataclass(frozen=True)
class ModelArch:
    """Transformer shape. Invariants: all sizes > 0; ``num_moe_layers + num_dense_layers ==
    num_layers``; ``num_experts == 0`` iff the model is dense."""

    model_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # real per-head width (explicit ``head_dim`` or hidden/heads)
    intermediate_size: int  # dense FFN width (0 when every layer is MoE)
    vocab_size: int
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # per-expert FFN width
    shared_expert_intermediate_size: int = 0  # always-on shared expert width (0 if none)
    num_moe_layers: int = 0
    weight_bytes_per_param: float = 2.0  # 2 bf16/fp16, 1 fp8/int8, 0.5 4-bit
    quantization: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "vocab_size"):
            if int(getattr(self, field)) <= 0:
                raise ConfigError(f"{self.model_id}: {field} must be > 0", key=field)
        if self.num_experts and not (self.experts_per_token and self.moe_intermediate_size):
            raise ConfigError(f"{self.model_id}: MoE model needs experts_per_token and expert "
                              "FFN size", key="num_experts_per_tok")
        if not 0 <= self.num_moe_layers <= self.num_layers:
            raise ConfigError(f"{self.model_id}: num_moe_layers out of range")
        if self.num_dense_layers and self.intermediate_size <= 0:
            raise ConfigError(f"{self.model_id}: dense layers need intermediate_size",
                              key="intermediate_size")

    # -- derived shapes ------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def is_interleaved_moe(self) -> bool:
        """Both dense and MoE layers (BLIS's b[7] applies only to these)."""
        return 0 < self.num_moe_layers < self.num_layers

    @property
    def q_dim(self) -> int:
        """Real query width H·head_dim (differs from hidden_size for some models)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Real K (or V) width kv_heads·head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def blis_head_dim(self) -> float:
        """BLIS's d_h = d / H (ignores an explicit head_dim)."""
        return self.hidden_size / self.num_heads

    @property
    def blis_kv_dim(self) -> float:
        return self.num_kv_heads * self.blis_head_dim

    @property
    def blis_weight_bytes(self) -> float:
        """BLIS's wbpp: 1 for FP8 checkpoints, else 2."""
        return 1.0 if self.weight_bytes_per_param == 1.0 else 2.0

    @property
    def quantizes_activations(self) -> bool:
        """W8A8 (FP8 / INT8 weights AND activations): every linear layer's input is
        quantized to 1 byte by its own kernel before the GEMM (dynamic per-token scales);
        4-bit weight-only schemes dequantize inside the GEMM instead."""
        return self.weight_bytes_per_param == 1.0

    @property
    def attention_params_per_layer(self) -> int:
        """Q, K, V, O projection parameters of one layer (real shapes)."""
        d = self.hidden_size
        return d * self.q_dim * 2 + d * self.kv_dim * 2

    @property
    def dense_ffn_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return 3 * self.hidden_size * self.shared_expert_intermediate_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _quantization(cfg: dict[str, Any], override: str | None) -> tuple[str | None, float]:
    method = override
    if method is None:
        qc = cfg.get("quantization_config") or {}
        method = qc.get("quant_method") or qc.get("format")
        bits = qc.get("bits") or qc.get("w_bit")
        if method and bits:
            return str(method).lower(), float(bits) / 8.0
    if method is None:
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower()
        if "float8" in dtype or "fp8" in dtype:
            return "fp8", 1.0
        return None, 2.0
    method = str(method).lower()
    if method in ("none", "null", ""):
        return None, 2.0
    return method, _QUANT_BYTES.get(method, 1.0 if "8" in method else 2.0)


def _moe_layer_count(cfg: dict[str, Any], num_layers: int) -> int:
    if cfg.get("first_k_dense_replace") is not None:  # DeepSeek
        freq = int(cfg.get("moe_layer_freq") or 1)
        first = int(cfg["first_k_dense_replace"])
        return sum(1 for i in range(first, num_layers) if (i - first) % freq == 0)
    step = _first(cfg, "interleave_moe_layer_step", "decoder_sparse_step", default=1)
    step = max(1, int(step))
    dense_only = set(cfg.get("mlp_only_layers") or [])
    return sum(1 for i in range(num_layers) if (i + 1) % step == 0 and i not in dense_only)


def arch_from_hf_config(cfg: dict[str, Any], model_id: str = "",
                        quantization: str | None = None, source: str = "config.json") -> ModelArch:
    """Build a ModelArch from a parsed HuggingFace config.json (``text_config`` is honoured)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    model_id = model_id or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")

    def need(*keys: str) -> Any:
        value = _first(cfg, *keys)
        if value is None:
            raise ConfigError("missing in the model config", file=source, key=keys[0])
        return value

    num_layers = int(need("num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(need("hidden_size", "n_embd", "d_model"))
    heads = int(need("num_attention_heads", "n_head"))
    kv_heads = int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    num_experts = int(_first(cfg, "num_local_experts", "n_routed_experts", "num_experts",
                             default=0) or 0)
    method, wbytes = _quantization(cfg, quantization)
    if num_experts:
        k = int(need("num_experts_per_tok", "experts_per_token", "moe_topk"))
        moe_ff = int(_first(cfg, "moe_intermediate_size", default=0) or need("intermediate_size"))
        n_moe = _moe_layer_count(cfg, num_layers)
        dense_ff = int(_first(cfg, "intermediate_size_mlp", "intermediate_size", default=0))
        if n_moe == num_layers:
            dense_ff = int(_first(cfg, "intermediate_size_mlp", default=0) or dense_ff)
        shared = int(_first(cfg, "shared_expert_intermediate_size", default=0) or 0)
        if not shared and cfg.get("n_shared_experts"):
            shared = int(cfg["n_shared_experts"]) * moe_ff
    else:
        k, moe_ff, n_moe, shared = 0, 0, 0, 0
        dense_ff = int(need("intermediate_size", "n_inner", "ffn_dim"))
    return ModelArch(
        model_id=model_id, num_layers=num_layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=dense_ff,
        vocab_size=int(need("vocab_size")), num_experts=num_experts, experts_per_token=k,
        moe_intermediate_size=moe_ff, shared_expert_intermediate_size=shared,
        num_moe_layers=n_moe, weight_bytes_per_param=wbytes, quantization=method,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def bundled_model_config(model_id: str) -> dict[str, Any] | None:
    """The bundled HF config.json of a well-known model id (case-insensitive), if any."""
    text = resources.files("blis_model.configuration.catalog").joinpath("models.json").read_text()
    catalog = {k.lower(): v for k, v in json.loads(text).items()}
    return catalog.get(model_id.lower())
