"""What a feature function needs besides the step columns: model, GPU and server knobs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blis_model.configuration.architecture import ModelArch
from blis_model.configuration.hardware import HardwareSpec

Columns = dict[str, np.ndarray]  # step-table column name → float64 array (one value per step)

KV_BYTES_PER_ELEMENT = 2.0  # bf16 KV cache


@dataclass(frozen=True)
class FeatureContext:
    """Constants shared by every step of one experiment."""

    arch: ModelArch
    hardware: HardwareSpec
    tensor_parallelism: int = 1
    data_parallelism: int = 1

    @property
    def tp(self) -> int:
        return self.tensor_parallelism


def column(steps: Columns, name: str) -> np.ndarray:
    """A step column as float64 (0 where the table lacks it)."""
    value = steps.get(name)
    if value is None:
        any_col = next(iter(steps.values()))
        return np.zeros(len(any_col))
    return np.asarray(value, dtype=np.float64)
