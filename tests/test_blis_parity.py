"""BLIS parity: ``features.blis_parity`` pinned to values computed by hand from the
formulas of ``shared/docs/blis-latency-model.md`` for concrete steps.

Every expected value below is written out as arithmetic on literal numbers (model
shapes, datasheet peaks, the step's tokens), never through the code under test.
H100: TFlopsPeak 989.5 → 989.5e6 FLOP/µs, TFlopsFP8 1979 → 1979e6 FLOP/µs,
BwPeakTBs 3.35 → 3.35e6 bytes/µs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blis_model.calibration.featurize import load_experiments
from blis_model.configuration.architecture import ModelArch
from blis_model.configuration.hardware import hardware_spec
from blis_model.features.blis_parity import BETA_NAMES, blis_basis, blis_step_time
from blis_model.features.context import FeatureContext
from blis_model.features.frame import feature_frame
from blis_model.ingest.reader import read_step_table

H100 = hardware_spec("H100")
PEAK_BF16 = 989.5e6  # FLOP/µs
PEAK_FP8 = 1979.0e6
BW = 3.35e6  # bytes/µs

LLAMA2_7B = ModelArch("meta-llama/Llama-2-7b-hf", num_layers=32, hidden_size=4096,
                      num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008,
                      vocab_size=32000)
LLAMA31_8B = ModelArch("meta-llama/Llama-3.1-8B", num_layers=32, hidden_size=4096,
                       num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                       vocab_size=128256)
MIXTRAL = ModelArch("mistralai/Mixtral-8x7B-v0.1", num_layers=32, hidden_size=4096,
                    num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                    vocab_size=32000, num_experts=8, experts_per_token=2,
                    moe_intermediate_size=14336, num_moe_layers=32)
# 4 layers: 2 dense (FFN 128) + 2 MoE (4 experts of FFN 96, top-1); d=64, H=4, kv=2
TOY_INTERLEAVED = ModelArch("toy/interleaved-moe", num_layers=4, hidden_size=64, num_heads=4,
                            num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
                            num_experts=4, experts_per_token=1, moe_intermediate_size=96,
                            num_moe_layers=2)


def step(pf: list[tuple[int, int]] = (), dc: list[int] = ()) -> dict[str, np.ndarray]:
    """One step's columns from prefill chunks (t = tokens, s = full prompt) and decode
    contexts, as the step table holds them."""
    t = np.array([c[0] for c in pf], dtype=float)
    s = np.array([c[1] for c in pf], dtype=float)
    cols = {"pf_count": len(pf), "pf_tokens": t.sum(), "pf_tokens_sq": (t * t).sum(),
            "pf_prompt_tokens": (t * s).sum(), "dc_count": len(dc), "dc_ctx_sum": sum(dc)}
    return {k: np.array([float(v)]) for k, v in cols.items()}


def basis(arch: ModelArch, cols: dict[str, np.ndarray], tp: int = 1, gpu: str = "H100"
          ) -> dict[str, float]:
    row = blis_basis(cols, FeatureContext(arch, hardware_spec(gpu), tp))[0]
    return dict(zip(BETA_NAMES, row.tolist(), strict=True))


def assert_basis(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(expected) == set(BETA_NAMES)
    for name in BETA_NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name


# -- dense model, TP = 1: one prefill chunk + two decodes --------------------------------
LLAMA2_STEP = step(pf=[(512, 2048)], dc=[1000, 3000])
# L=32, d=4096, H=32, d_h=4096/32=128, d_kv=32·128=4096, d_ff=11008, wbpp=2
LLAMA2_EXPECTED = {
    # proj 32·2·512·4096·(2·4096+2·4096) = 2_199_023_255_552
    # attn 32·4·32·512·(2048 + 512/2)·128 = 618_475_290_624
    # ffn  32·512·6·4096·11008 = 4_432_406_249_472
    "T_pf_compute": 7_249_904_795_648 / PEAK_BF16,  # ≈ 7326.84 µs
    # proj 32·2·2·4096·16384 = 8_589_934_592; attn 32·4·32·(1000+3000)·128 = 2_097_152_000;
    # ffn 32·2·6·4096·11008 = 17_314_086_912
    "T_dc_compute": 28_001_173_504 / PEAK_BF16,  # ≈ 28.30 µs
    # 32·4096·16384·2 + 32·3·4096·11008·2 = 4_294_967_296 + 8_657_043_456
    "T_weight": 12_952_010_752 / BW,  # ≈ 3866.27 µs
    "T_tp": 0.0,
    "L": 32, "B": 3, "step": 1, "L_moe": 0,
    "T_pf_kv": 32 * 2 * 4096 * 512 * 2 / BW,  # 268_435_456 bytes ≈ 80.13 µs
    "T_dc_kv": 32 * 2 * 4096 * 2 * (4000 + 2) / BW,  # 2_098_200_576 bytes ≈ 626.33 µs
    "T_moe_dispatch": 0.0,
}


def test_dense_llama2_7b_tp1_prefill_chunk_and_two_decodes():
    assert 32 * 2 * 512 * 4096 * (2 * 4096 + 2 * 4096) == 2_199_023_255_552
    assert 32 * 4 * 32 * 512 * (2048 + 512 / 2) * 128 == 618_475_290_624
    assert 32 * 512 * 6 * 4096 * 11008 == 4_432_406_249_472
    assert 2_199_023_255_552 + 618_475_290_624 + 4_432_406_249_472 == 7_249_904_795_648
    assert 8_589_934_592 + 2_097_152_000 + 17_314_086_912 == 28_001_173_504
    assert_basis(basis(LLAMA2_7B, LLAMA2_STEP), LLAMA2_EXPECTED)
    assert LLAMA2_EXPECTED["T_pf_compute"] == pytest.approx(7326.837, abs=1e-3)
    assert LLAMA2_EXPECTED["T_weight"] == pytest.approx(3866.272, abs=1e-3)


def test_blis_uses_the_full_prompt_not_the_context_so_far():
    """s_i is the full prompt length: the same chunk at any context costs the same."""
    fresh = basis(LLAMA2_7B, step(pf=[(512, 2048)]))["T_pf_compute"]
    cols = step(pf=[(512, 2048)])
    cols["pf_ctx_tokens"] = np.array([512.0 * 1536])  # 1536 tokens already computed
    assert basis(LLAMA2_7B, cols)["T_pf_compute"] == fresh


def test_blis_ignores_an_explicit_head_dim():
    """d_h = d / H even when config.json says otherwise."""
    odd = ModelArch("x", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                    head_dim=32, intermediate_size=100, vocab_size=10)
    got = basis(odd, step(dc=[10]))
    # d_h = 64/4 = 16, d_kv = 2·16 = 32: proj 2·2·1·64·(128+64); attn 2·4·4·10·16; ffn 2·1·6·64·100
    assert got["T_dc_compute"] == pytest.approx((49_152 + 5_120 + 76_800) / PEAK_BF16, rel=1e-12)
    assert got["T_dc_kv"] == pytest.approx(2 * 2 * 32 * 2 * (10 + 1) / BW, rel=1e-12)


# -- MoE (Mixtral 8x7B, every layer MoE: not interleaved) ----------------------------------
def test_moe_mixtral_step():
    got = basis(MIXTRAL, step(pf=[(256, 256)], dc=[2000, 3000, 2500, 2500]))
    # L=32 (all MoE: L_dense=0, L_moe=32), d=4096, H=32, d_h=128, d_kv=8·128=1024,
    # E=8, k_eff=2, d_ff_moe=14336
    assert (32 * 2 * 256 * 4096 * (8192 + 2048)  # proj 687_194_767_360
            + 32 * 4 * 32 * 256 * (256 + 128) * 128  # attn 51_539_607_552
            + 32 * (256 * 2) * 6 * 4096 * 14336  # experts 5_772_436_045_824
            ) == 6_511_170_420_736
    assert (32 * 2 * 4 * 4096 * 10240  # proj 10_737_418_240
            + 32 * 4 * 32 * 10_000 * 128  # attn 5_242_880_000
            + 32 * (4 * 2) * 6 * 4096 * 14336  # experts 90_194_313_216
            ) == 106_174_611_456
    # weights: attention 32·4096·10240·2 + ALL 8 experts 32·8·3·4096·14336·2
    assert 32 * 4096 * 10240 * 2 + 32 * 8 * 3 * 4096 * 14336 * 2 == 92_878_667_776
    assert_basis(got, {
        "T_pf_compute": 6_511_170_420_736 / PEAK_BF16,
        "T_dc_compute": 106_174_611_456 / PEAK_BF16,
        "T_weight": 92_878_667_776 / BW,  # ≈ 27725 µs: the whole 46.7B params
        "T_tp": 0.0, "L": 32, "B": 5, "step": 1,
        "L_moe": 0,  # uniform MoE: BLIS's b[7] does not apply
        "T_pf_kv": 32 * 2 * 1024 * 256 * 2 / BW,  # 33_554_432 bytes
        "T_dc_kv": 32 * 2 * 1024 * 2 * (10_000 + 4) / BW,  # 1_311_244_288 bytes
        "T_moe_dispatch": 0.0,
    })


def test_moe_mixtral_tp2_all_reduce_counts_moe_layers():
    got = basis(MIXTRAL, step(pf=[(256, 256)], dc=[2000, 3000, 2500, 2500]), tp=2)
    # (L + L_dense + L_moe)·(T_pf + T_dc)·d·2·2·(TP−1)/TP / bw = (32+0+32)·260·4096·4·½ / bw
    assert got["T_tp"] == pytest.approx(64 * 260 * 4096 * 2 * 2 * (1 / 2) / BW, rel=1e-12)
    # experts: (T·k_eff/TP) tokens per GPU; weights: E/TP experts per GPU
    assert got["T_weight"] == pytest.approx(
        (32 * 4096 * 10240 * 2 / 2 + 32 * (8 / 2) * 3 * 4096 * 14336 * 2) / BW, rel=1e-12)


# -- interleaved MoE toy arch ---------------------------------------------------------------
def test_interleaved_moe_toy_arch():
    got = basis(TOY_INTERLEAVED, step(pf=[(10, 30)], dc=[20]))
    # L=4 (L_dense=2, L_moe=2), d=64, H=4, d_h=16, d_kv=2·16=32, d_ff=128, E=4, k_eff=1,
    # d_ff_moe=96
    pf = (4 * 2 * 10 * 64 * (128 + 64)  # proj 983_040
          + 4 * 4 * 4 * 10 * (30 + 10 / 2) * 16  # attn 358_400
          + 2 * 10 * 6 * 64 * 128  # dense FFN 983_040
          + 2 * (10 * 1) * 6 * 64 * 96)  # MoE FFN 737_280
    dc = (4 * 2 * 1 * 64 * (128 + 64)  # 98_304
          + 4 * 4 * 4 * 20 * 16  # 20_480
          + 2 * 1 * 6 * 64 * 128  # 98_304
          + 2 * (1 * 1) * 6 * 64 * 96)  # 73_728
    assert pf == 3_061_760 and dc == 290_816
    weight = (4 * 64 * (128 + 64) * 2  # 98_304
              + 2 * 3 * 64 * 128 * 2  # 98_304
              + 2 * 4 * 3 * 64 * 96 * 2)  # 294_912
    assert weight == 491_520
    assert_basis(got, {
        "T_pf_compute": 3_061_760 / PEAK_BF16, "T_dc_compute": 290_816 / PEAK_BF16,
        "T_weight": 491_520 / BW, "T_tp": 0.0, "L": 4, "B": 2, "step": 1,
        "L_moe": 2,  # interleaved: b[7] counts the MoE layers
        "T_pf_kv": 4 * 2 * 32 * 10 * 2 / BW,  # 5120 bytes
        "T_dc_kv": 4 * 2 * 32 * 2 * (20 + 1) / BW,  # 10_752 bytes
        "T_moe_dispatch": 0.0,
    })


# -- TP = 2 --------------------------------------------------------------------------------
def test_dense_llama31_8b_tp2_step():
    got = basis(LLAMA31_8B, step(pf=[(1000, 1000)], dc=[1000, 1000, 1000]), tp=2)
    # L=32, d=4096, H=32 (16 per GPU), d_h=128, d_kv=8·128=1024 (512 per GPU), d_ff=14336
    pf = (32 * 2 * 1000 * 4096 * (8192 + 2048) / 2  # proj 1_342_177_280_000
          + 32 * 4 * (32 / 2) * 1000 * (1000 + 500) * 128  # attn 393_216_000_000
          + 32 * 1000 * 6 * 4096 * 14336 / 2)  # ffn 5_637_144_576_000
    dc = (32 * 2 * 3 * 4096 * 10240 / 2  # 4_026_531_840
          + 32 * 4 * (32 / 2) * 3000 * 128  # 786_432_000
          + 32 * 3 * 6 * 4096 * 14336 / 2)  # 16_911_433_728
    assert pf == 7_372_537_856_000 and dc == 21_724_397_568
    assert_basis(got, {
        "T_pf_compute": 7_372_537_856_000 / PEAK_BF16,
        "T_dc_compute": 21_724_397_568 / PEAK_BF16,
        "T_weight": (32 * 4096 * 10240 * 2 / 2 + 32 * 3 * 4096 * 14336 * 2 / 2) / BW,
        # (L + L_dense)·(T_pf + T_dc)·d·2·2·(TP−1)/TP / bw = 64·1003·4096·4·½ / bw
        "T_tp": 64 * 1003 * 4096 * 2 * 2 * (1 / 2) / BW,  # 525_860_864 bytes ≈ 156.97 µs
        "L": 32, "B": 4, "step": 1, "L_moe": 0,
        "T_pf_kv": 32 * 2 * (1024 / 2) * 1000 * 2 / BW,
        "T_dc_kv": 32 * 2 * (1024 / 2) * 2 * (3000 + 3) / BW,
        "T_moe_dispatch": 0.0,
    })
    assert got["T_tp"] == pytest.approx(156.973, abs=1e-3)


# -- quantized weights -----------------------------------------------------------------------
def _quantized(arch: ModelArch, wbytes: float, method: str) -> ModelArch:
    return ModelArch(**{**arch.to_dict(), "weight_bytes_per_param": wbytes,
                        "quantization": method})


def test_fp8_model_uses_fp8_peak_and_one_byte_weights():
    fp8 = _quantized(LLAMA31_8B, 1.0, "fp8")
    got = basis(fp8, step(pf=[(100, 100)]))
    pf = (32 * 2 * 100 * 4096 * 10240  # proj 268_435_456_000
          + 32 * 4 * 32 * 100 * (100 + 50) * 128  # attn 7_864_320_000
          + 32 * 100 * 6 * 4096 * 14336)  # ffn 1_127_428_915_200
    assert pf == 1_403_728_691_200
    assert got["T_pf_compute"] == pytest.approx(1_403_728_691_200 / PEAK_FP8, rel=1e-12)
    # wbpp = 1: 32·4096·10240·1 + 32·3·4096·14336·1 = 6_979_321_856 bytes
    assert got["T_weight"] == pytest.approx(6_979_321_856 / BW, rel=1e-12)
    assert got["T_pf_kv"] == pytest.approx(32 * 2 * 1024 * 100 * 2 / BW, rel=1e-12)  # KV 2 B
    # a GPU without FP8 units (A100-80: 312 TFLOP/s, 2.039 TB/s) keeps its bf16 peak
    a100 = basis(fp8, step(pf=[(100, 100)]), gpu="A100-80")
    assert a100["T_pf_compute"] == pytest.approx(1_403_728_691_200 / 312e6, rel=1e-12)
    assert a100["T_weight"] == pytest.approx(6_979_321_856 / 2.039e6, rel=1e-12)


def test_four_bit_weights_count_as_two_bytes_in_blis():
    """BLIS's wbpp is 1 (FP8) or 2: a 4-bit checkpoint is costed like bf16."""
    awq = _quantized(LLAMA31_8B, 0.5, "awq")
    assert basis(awq, step(dc=[10])) == basis(LLAMA31_8B, step(dc=[10]))


# -- step time: 7 to 11 betas ------------------------------------------------------------------
PRIMES = [2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0, 29.0, 31.0]


def _llama2_row() -> np.ndarray:
    return np.array([[LLAMA2_EXPECTED[n] for n in BETA_NAMES]])


@pytest.mark.parametrize("n", [7, 8, 9, 10, 11])
def test_step_time_fold_rules(n):
    e = LLAMA2_EXPECTED
    # prefill is compute-bound (7326.8 > 80.1 µs), decode memory-bound (28.3 < 626.3 µs)
    assert e["T_pf_compute"] > e["T_pf_kv"] and e["T_dc_kv"] > e["T_dc_compute"]
    prefill = (2 * e["T_pf_compute"] + 23 * e["T_pf_kv"] if n >= 9
               else 2 * max(e["T_pf_compute"], e["T_pf_kv"]))
    decode = (3 * e["T_dc_compute"] + 29 * e["T_dc_kv"] if n >= 10
              else 3 * max(e["T_dc_compute"], e["T_dc_kv"]))
    rest = 5 * e["T_weight"] + 7 * 0.0 + 11 * 32 + 13 * 3 + 17 * 1
    rest += 19 * 0 if n >= 8 else 0  # L_moe = 0 (dense)
    rest += 31 * 0.0 if n >= 11 else 0  # no MoE dispatch at DP = 1
    got = blis_step_time(_llama2_row(), np.array(PRIMES[:n]))
    assert got[0] == pytest.approx(prefill + decode + rest, rel=1e-12)


def test_step_time_b7_applies_to_interleaved_moe_only():
    toy = blis_basis(step(pf=[(10, 30)], dc=[20]), FeatureContext(TOY_INTERLEAVED, H100, 1))
    with_b7 = blis_step_time(toy, np.array(PRIMES[:8]))
    without = blis_step_time(toy, np.array(PRIMES[:7]))
    assert with_b7[0] - without[0] == pytest.approx(19.0 * 2, rel=1e-12)  # b7·L_moe
    mixtral = blis_basis(step(dc=[5]), FeatureContext(MIXTRAL, H100, 1))
    assert (blis_step_time(mixtral, np.array(PRIMES[:8]))
            == blis_step_time(mixtral, np.array(PRIMES[:7]))).all()


def test_step_time_with_blis_shipped_defaults():
    """iter29 defaults on the llama-2-7b step, term by term."""
    beta = [0.152128, 0.0, 1.36252915, 0.752037, 32.09546717, 4.41684444, 126.024825,
            481.8613888, 0.0, 1.94710771, 0.752037]
    e = LLAMA2_EXPECTED
    expected = (0.152128 * e["T_pf_compute"] + 0.0 * e["T_pf_kv"]
                + 0.0 * e["T_dc_compute"] + 1.94710771 * e["T_dc_kv"]
                + 1.36252915 * e["T_weight"] + 0.752037 * 0.0
                + 32.09546717 * 32 + 4.41684444 * 3 + 126.024825)
    got = blis_step_time(_llama2_row(), np.array(beta))[0]
    assert got == pytest.approx(expected, rel=1e-12)
    # ≈ 1114.6 + 1219.5 + 5267.9 + 1027.1 + 13.3 + 126.0
    assert got == pytest.approx(8768.38, abs=0.01)


@pytest.mark.parametrize("n", [0, 6, 12])
def test_step_time_rejects_other_beta_counts(n):
    with pytest.raises(ValueError, match="7 to 11 betas"):
        blis_step_time(_llama2_row(), np.ones(n))


# -- a real traced step, end to end ---------------------------------------------------------
def test_real_step_through_the_feature_frame():
    """llama-2-7b step 163 of the sample: chunks (t, s) = (241, 6465), (12, 109) and
    decodes with contexts 52, 115, 99 (see tests/test_ingest.py)."""
    corpus = Path(__file__).resolve().parents[1] / "corpus" / "h100-real-steps"
    exp = next(e for e in load_experiments(str(corpus)) if e.name == "h100-llama-2-7b-bf16")
    frame = feature_frame(exp, read_step_table(exp)[0])
    row = frame.loc[frame["step_id"] == 163].iloc[0]
    attn_sum = 241 * (6465 + 241 / 2) + 12 * (109 + 12 / 2)  # Σ t(s + t/2) = 1_588_485.5
    assert attn_sum == 1_588_485.5
    pf = (32 * 2 * 253 * 4096 * 16384 + 32 * 4 * 32 * 1_588_485.5 * 128
          + 32 * 253 * 6 * 4096 * 11008)
    dc = 32 * 2 * 3 * 4096 * 16384 + 32 * 4 * 32 * 266 * 128 + 32 * 3 * 6 * 4096 * 11008
    expected = {
        "T_pf_compute": pf / PEAK_BF16, "T_dc_compute": dc / PEAK_BF16,
        "T_weight": 12_952_010_752 / BW, "T_tp": 0.0, "L": 32, "B": 5, "step": 1,
        "L_moe": 0, "T_pf_kv": 32 * 2 * 4096 * 253 * 2 / BW,
        "T_dc_kv": 32 * 2 * 4096 * 2 * (266 + 3) / BW, "T_moe_dispatch": 0.0,
    }
    got = {name: float(row[f"blis_{i}"]) for i, name in enumerate(BETA_NAMES)}
    assert_basis(got, expected)
