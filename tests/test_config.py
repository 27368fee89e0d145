"""Configuration parsing: hardware catalog, HF architectures, exp-config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blis_model.configuration.architecture import arch_from_hf_config, bundled_model_config
from blis_model.configuration.experiment import load_experiment, parse_server_config
from blis_model.configuration.hardware import hardware_spec, known_hardware
from blis_model.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"


def test_catalog_has_the_required_gpus() -> None:
    for name in ("H100", "H200", "A100-40", "A100-80", "L40S", "B200"):
        spec = hardware_spec(name)
        assert spec.tflops_bf16 > 0 and spec.hbm_tbs > 0 and spec.memory_gib > 0
    assert hardware_spec("a100-sxm").name == "A100-80"
    assert hardware_spec("H100").peak_flops_per_us(1.0) == 1979.0e6  # FP8 peak for 1-byte weights
    assert hardware_spec("A100-80").peak_flops_per_us(1.0) == 312.0e6  # no FP8 units


def test_unknown_hardware_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        hardware_spec("TPUv9")
    for name in known_hardware():
        assert name in str(err.value)


def test_mixtral_is_moe_with_all_layers_sparse() -> None:
    cfg = json.loads((SAMPLE / "h100-mixtral-8x7b-bf16" / "config.json").read_text())
    arch = arch_from_hf_config(cfg, "mistralai/Mixtral-8x7B-v0.1")
    assert arch.is_moe and arch.num_experts == 8 and arch.experts_per_token == 2
    assert arch.num_moe_layers == 32 and arch.num_dense_layers == 0
    assert not arch.is_interleaved_moe
    assert arch.moe_intermediate_size == 14336


def test_explicit_head_dim_and_fp8_are_honoured() -> None:
    cfg = bundled_model_config("Qwen/Qwen3-30B-A3B")
    assert cfg is not None
    arch = arch_from_hf_config(cfg, "Qwen/Qwen3-30B-A3B")
    assert arch.head_dim == 128 and arch.blis_head_dim == 2048 / 32  # BLIS ignores head_dim
    fp8 = arch_from_hf_config(bundled_model_config("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"))
    assert fp8.weight_bytes_per_param == 1.0 and fp8.blis_weight_bytes == 1.0


def test_interleaved_moe_layers() -> None:
    cfg = {"num_hidden_layers": 48, "hidden_size": 5120, "num_attention_heads": 40,
           "num_key_value_heads": 8, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
           "num_local_experts": 128, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
           "vocab_size": 202048}
    arch = arch_from_hf_config(cfg, "toy/llama4-like")
    assert arch.num_moe_layers == 24 and arch.is_interleaved_moe
    assert arch.intermediate_size == 16384 and arch.moe_intermediate_size == 8192


def test_missing_keys_name_the_file_and_key() -> None:
    with pytest.raises(ConfigError, match="exp/exp-config.yaml: key 'max_num_seqs'"):
        parse_server_config({"model": "m", "hardware": "H100", "max_num_batched_tokens": 8},
                            experiment="exp", file="exp/exp-config.yaml")
    with pytest.raises(ConfigError, match="key 'hardware'"):
        parse_server_config({"model": "m", "max_num_batched_tokens": 8, "max_num_seqs": 4})
    cfg = parse_server_config({"model": "m", "max_num_batched_tokens": 8, "max_num_seqs": 4},
                              default_hardware="H100")
    assert cfg.hardware == "H100"


def test_sample_experiment_loads_with_its_config_key() -> None:
    exp = load_experiment(str(SAMPLE), "h100-llama-3.1-8b-bf16")
    assert exp.arch.num_kv_heads == 8 and exp.hardware.name == "H100"
    assert exp.trace_url and exp.trace_url.endswith("traces.json.gz")
    assert exp.config_key == "meta-llama/llama-3.1-8b|H100|tp1|bf16|mnbt8192|mns256"
