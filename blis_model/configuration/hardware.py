"""GPU hardware catalog: datasheet peaks used to turn FLOPs and bytes into µs.

All numbers are vendor datasheet values for dense (non-sparse) math. Units are stated
in the field names: TFLOP/s, TB/s (1e12 bytes/s), GB/s (1e9 bytes/s), GiB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blis_model.errors import ConfigError


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU model. Invariants: all peaks > 0 except ``tflops_fp8`` (0 = no FP8 units)."""

    name: str
    tflops_bf16: float  # dense bf16/fp16 tensor-core peak, TFLOP/s
    tflops_fp8: float  # dense fp8 tensor-core peak, TFLOP/s (0 if unsupported)
    hbm_tbs: float  # HBM bandwidth, TB/s
    memory_gib: float
    interconnect_gbs: float  # per-direction GPU-GPU bandwidth (NVLink, else PCIe), GB/s
    pcie_gbs: float  # per-direction host link bandwidth (CPU offload), GB/s
    sm_count: int  # streaming multiprocessors (parallel attention work units)
    mfu_prefill: float = 0.45  # BLIS roofline defaults, exported in hardware_config.json
    mfu_decode: float = 0.30

    def __post_init__(self) -> None:
        for field in ("tflops_bf16", "hbm_tbs", "memory_gib", "interconnect_gbs", "pcie_gbs",
                      "sm_count"):
            value = getattr(self, field)
            if not value > 0:
                raise ConfigError(f"hardware {self.name}: {field} must be > 0, got {value}")
        if self.tflops_fp8 < 0:
            raise ConfigError(f"hardware {self.name}: tflops_fp8 must be >= 0")

    def peak_flops_per_us(self, weight_bytes_per_param: float) -> float:
        """Tensor-core peak in FLOP/µs; FP8 peak when weights are 1 byte and FP8 exists."""
        if weight_bytes_per_param <= 1 and self.tflops_fp8 > 0:
            return self.tflops_fp8 * 1e6
        return self.tflops_bf16 * 1e6

    @property
    def hbm_bytes_per_us(self) -> float:
        return self.hbm_tbs * 1e6

    @property
    def interconnect_bytes_per_us(self) -> float:
        return self.interconnect_gbs * 1e3

    @property
    def pcie_bytes_per_us(self) -> float:
        return self.pcie_gbs * 1e3

    def to_blis(self) -> dict[str, float]:
        """This GPU as an entry of BLIS's ``hardware_config.json``."""
        return {
            "TFlopsPeak": self.tflops_bf16,
            "TFlopsFP8": self.tflops_fp8,
            "BwPeakTBs": self.hbm_tbs,
            "mfuPrefill": self.mfu_prefill,
            "mfuDecode": self.mfu_decode,
            "MemoryGiB": self.memory_gib,
        }

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


_CATALOG: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        HardwareSpec("H100", 989.5, 1979.0, 3.35, 80.0, 450.0, 64.0, 132),
        HardwareSpec("H100-PCIe", 756.0, 1513.0, 2.0, 80.0, 64.0, 64.0, 114),
        HardwareSpec("H200", 989.5, 1979.0, 4.8, 141.0, 450.0, 64.0, 132),
        HardwareSpec("A100-80", 312.0, 0.0, 2.039, 80.0, 300.0, 32.0, 108),
        HardwareSpec("A100-40", 312.0, 0.0, 1.555, 40.0, 300.0, 32.0, 108),
        HardwareSpec("L40S", 362.05, 733.0, 0.864, 48.0, 32.0, 32.0, 142),
        HardwareSpec("B200", 2250.0, 4500.0, 8.0, 180.0, 900.0, 64.0, 148),
    )
}
_ALIASES = {
    "H100-SXM": "H100", "H100-SXM5": "H100", "H100-80": "H100", "H200-SXM": "H200",
    "A100": "A100-80", "A100-SXM": "A100-80", "A100-SXM-80": "A100-80", "A100-80GB": "A100-80",
    "A100-40GB": "A100-40", "A100-SXM-40": "A100-40", "B200-SXM": "B200",
}


def known_hardware() -> list[str]:
    """Canonical GPU names of the catalog, sorted."""
    return sorted(_CATALOG)


def hardware_spec(name: str) -> HardwareSpec:
    """Look a GPU up by name or alias (case-insensitive). Raises ConfigError if unknown."""
    by_upper = {k.upper(): v for k, v in _CATALOG.items()}
    aliases = {k.upper(): v for k, v in _ALIASES.items()}
    key = str(name).strip().upper()
    if key in aliases:
        key = aliases[key].upper()
    if key not in by_upper:
        raise ConfigError(
            f"unknown hardware '{name}'; known: {', '.join(known_hardware())}", key="hardware"
        )
    return by_upper[key]
