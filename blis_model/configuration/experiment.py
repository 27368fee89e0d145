"""Experiments: one vLLM server configuration serving one workload, and how to find them.

An experiment is any folder under a corpus URL that holds an ``exp-config.yaml``; it
may hold ``config.json`` (the model's HF config), ``traces.json[.gz]`` and/or client request
measurements (``Experiment.kinds``; :mod:`blis_model.ingest.measurements` reads them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from blis_model.configuration.architecture import (
    ModelArch,
    arch_from_hf_config,
    bundled_model_config,
)
from blis_model.configuration.defaults import DEFAULT_BLOCK_SIZE
from blis_model.configuration.hardware import HardwareSpec, hardware_spec
from blis_model.configuration.kinds import TRACES, folder_kinds
from blis_model.errors import ConfigError, CorpusError
from blis_model.storage import filesystem, join

EXP_CONFIG = "exp-config.yaml"
TRACE_NAMES = ("traces.json", "traces.json.gz")


@dataclass(frozen=True)
class ServerConfig:
    """The vLLM server knobs of an experiment (from ``exp-config.yaml``)."""

    model: str
    hardware: str
    tensor_parallelism: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int | None = None
    quantization: str | None = None
    vllm_version: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE  # KV block size, tokens
    data_parallelism: int = 1
    num_gpu_blocks: int | None = None  # KV blocks the server reported (optional)

    def __post_init__(self) -> None:
        for name in ("tensor_parallelism", "max_num_batched_tokens", "max_num_seqs", "block_size",
                     "data_parallelism"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"must be a positive integer, got {getattr(self, name)!r}",
                                  key=name)

    def config_key(self, arch: ModelArch) -> str:
        """Identity of the configuration (model, GPU, TP, quantization, scheduler knobs):
        two experiments with the same key share calibrated terms, whatever their folders.
        The model id is lower-cased and the GPU is its canonical catalog name (``h100``
        and ``H100-SXM`` are ``H100``), so spelling never splits a configuration."""
        quant = arch.quantization or "bf16"
        gpu = hardware_spec(self.hardware).name
        return (f"{self.model.lower()}|{gpu}|tp{self.tensor_parallelism}|{quant}"
                f"|mnbt{self.max_num_batched_tokens}|mns{self.max_num_seqs}")


@dataclass(frozen=True)
class Experiment:
    """A located, fully configured experiment. ``name`` is its path relative to the corpus."""

    name: str
    url: str
    server: ServerConfig
    arch: ModelArch
    hardware: HardwareSpec
    trace_url: str | None
    trace_identity: dict[str, Any] = field(default_factory=dict)  # size/etag/mtime
    kinds: frozenset[str] = frozenset()  # "traces" and/or "measurements" (ingest.kinds)

    @property
    def config_key(self) -> str:
        return self.server.config_key(self.arch)


def _rel(path: str, root: str) -> str:
    rel = path[len(root):].strip("/") if path.startswith(root) else path
    return rel or "."


def discover_experiments(corpus_url: str, options: dict | None = None) -> list[str]:
    """Relative names of every folder under ``corpus_url`` holding an exp-config.yaml, sorted."""
    fs, root = filesystem(corpus_url, options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise CorpusError(f"corpus {corpus_url} does not exist")
    found = fs.glob(f"{root}/**/{EXP_CONFIG}") + fs.glob(f"{root}/{EXP_CONFIG}")
    names = sorted({_rel(p.rsplit("/", 1)[0], root) for p in found})
    return names


def _read_yaml(fs: Any, path: str, label: str, experiment: str) -> dict[str, Any]:
    try:
        with fs.open(path, "rb") as fh:
            data = yaml.safe_load(fh.read())
    except FileNotFoundError:
        raise ConfigError("file not found", file=label, experiment=experiment) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", file=label, experiment=experiment) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping", file=label, experiment=experiment)
    return data


def parse_server_config(data: dict[str, Any], *, experiment: str = "", file: str = EXP_CONFIG,
                        default_hardware: str | None = None) -> ServerConfig:
    """Validate an exp-config mapping. Missing required keys raise ConfigError naming them;
    a missing ``hardware`` is an error unless ``default_hardware`` is given."""

    def need(key: str) -> Any:
        if data.get(key) is None:
            if key == "hardware" and default_hardware:
                return default_hardware
            raise ConfigError("missing required key", file=file, key=key, experiment=experiment)
        return data[key]

    try:
        return ServerConfig(
            model=str(need("model")),
            hardware=str(need("hardware")),
            tensor_parallelism=int(data.get("tensor_parallelism") or 1),
            max_num_batched_tokens=int(need("max_num_batched_tokens")),
            max_num_seqs=int(need("max_num_seqs")),
            max_model_len=int(data["max_model_len"]) if data.get("max_model_len") else None,
            quantization=(str(data["quantization"]) if data.get("quantization") else None),
            vllm_version=str(data["vllm_version"]) if data.get("vllm_version") else None,
            block_size=int(data.get("block_size") or DEFAULT_BLOCK_SIZE),
            data_parallelism=int(data.get("data_parallelism") or 1),
            num_gpu_blocks=int(data["num_gpu_blocks"]) if data.get("num_gpu_blocks") else None,
        )
    except ConfigError as exc:
        if exc.experiment:
            raise
        raise ConfigError(str(exc), file=file, experiment=experiment) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value ({exc})", file=file, experiment=experiment) from None


def load_experiment(corpus_url: str, name: str, options: dict | None = None,
                    default_hardware: str | None = None) -> Experiment:
    """Read an experiment's configuration, model architecture and hardware.

    Raises ConfigError naming the experiment, file and key on anything missing or unknown.
    """
    url = corpus_url if name == "." else join(corpus_url, name)
    fs, path = filesystem(url, options)
    path = path.rstrip("/")
    data = _read_yaml(fs, f"{path}/{EXP_CONFIG}", f"{name}/{EXP_CONFIG}", name)
    server = parse_server_config(data, experiment=name, file=f"{name}/{EXP_CONFIG}",
                                 default_hardware=default_hardware)
    try:
        hardware = hardware_spec(server.hardware)
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1], file=f"{name}/{EXP_CONFIG}",
                          key="hardware", experiment=name) from None
    server = dataclasses.replace(server, hardware=hardware.name)  # canonical GPU name
    cfg_path = f"{path}/config.json"
    if fs.exists(cfg_path):
        with fs.open(cfg_path, "rb") as fh:
            try:
                hf = json.loads(fh.read())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"not valid JSON ({exc})", file=f"{name}/config.json",
                                  experiment=name) from None
        source = f"{name}/config.json"
    else:
        hf = bundled_model_config(server.model)
        source = f"bundled catalog entry for {server.model}"
        if hf is None:
            raise ConfigError(
                f"no config.json and model '{server.model}' is not in the bundled catalog",
                file=f"{name}/{EXP_CONFIG}", key="model", experiment=name)
    try:
        arch = arch_from_hf_config(hf, server.model, server.quantization, source=source)
    except ConfigError as exc:
        raise ConfigError(str(exc), experiment=name) from None
    trace_url, identity = None, {}
    for trace in TRACE_NAMES:
        if fs.exists(f"{path}/{trace}"):
            info = fs.info(f"{path}/{trace}")
            trace_url = join(url, trace)
            identity = {k: str(info.get(k)) for k in ("size", "ETag", "etag", "mtime",
                                                         "LastModified") if info.get(k)}
            break
    kinds = folder_kinds(fs, path) | ({TRACES} if trace_url else set())
    return Experiment(name=name, url=url, server=server, arch=arch, hardware=hardware,
                      trace_url=trace_url, trace_identity=identity, kinds=frozenset(kinds))


def corpus_fingerprint(experiments: Sequence[Experiment]) -> str:
    """SHA-256 over experiment names, configuration keys and trace object identities."""
    h = hashlib.sha256()
    for e in sorted(experiments, key=lambda e: e.name):
        h.update(json.dumps([e.name, e.config_key, e.trace_identity], sort_keys=True).encode())
    return h.hexdigest()
