"""inference-perf (kubernetes-sigs/inference-perf, the Kubernetes SIG load generator): its
run configuration and its native per-request report, parsed into plain values.

**Run configuration.** ``profile.yaml`` is what the user asked for; ``config.yaml`` is
inference-perf's own dump of the configuration it parsed and ran. They can disagree:
inference-perf releases before the ``num_unique_system_prompts`` /
``num_users_per_system_prompt`` aliases knew only ``num_groups`` / ``num_prompts_per_group``
and silently ran their defaults (10 × 10) when a profile used the new names — which is
what every ``config.yaml`` of ``vllm-h100-requests`` shows. :func:`parse_workload` takes
each fact from ``config.yaml`` when it has it (what ran), else from the profile, and
reports every disagreement; the profile's shared-prefix block is kept as
``LoadProfile.declared_shared_prefix``.

**Native per-request report** (``per_request_lifecycle_metrics.json``): a JSON array with
one object per request (inference-perf ``reportgen/base.py``)::

    {"start_time": s, "end_time": s,           # client monotonic clock (perf_counter)
     "request": "<JSON body as a string>",     # model, prompt, max_tokens, ignore_eos, stream
     "response": "<text>" | null,
     "info": {...} | null,
     "error": {"error_type": str, "error_msg": str} | null,
     "session_id"?, "stage_id"?, "computed_metrics"?: {...}}

``info`` has two shapes. Releases up to early 2026 (``InferenceInfo``):
``{"input_tokens", "output_tokens", "output_token_times": [s, ...]}`` with one time per
streamed SSE message. Later releases: ``{"request_metrics": {"text": {"input_tokens"}},
"input_tokens" (deprecated mirror), "response_metrics": {"output_tokens",
"server_usage": {"prompt_tokens", "completion_tokens", ...} | null, "chunk_times": [s],
"output_token_times": [s] (per token: each chunk's time repeated per token it carried),
"response_chunks"?}, "extra_info", "lora_adapter", ...}``. ``output_tokens`` is always the
client's re-tokenized count; ``server_usage.completion_tokens`` (when the server sent a
usage chunk) is the server's own count of generated tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from blis_model.errors import ConfigError

# -- run configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class LoadStage:
    """One load stage: a constant request rate (requests/s) for ``duration_s`` seconds
    (or, for concurrency-driven stages, a number of concurrent requests)."""

    index: int
    rate: float | None
    duration_s: float | None
    concurrency: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rate is not None:
            out["rate"] = self.rate
        if self.duration_s is not None:
            out["duration"] = self.duration_s
        if self.concurrency is not None:
            out["concurrency_level"] = self.concurrency
        return out


@dataclass(frozen=True)
class SharedPrefix:
    """inference-perf's ``shared_prefix`` data generator: ``num_unique_system_prompts``
    system prompts of ``system_prompt_len`` tokens, each followed by
    ``num_users_per_system_prompt`` distinct questions of ``question_len`` tokens; every
    request asks for ``output_len`` tokens. A length given as a distribution is None."""

    num_unique_system_prompts: int | None = None
    num_users_per_system_prompt: int | None = None
    system_prompt_len: int | None = None
    question_len: int | None = None
    output_len: int | None = None
    enable_multi_turn_chat: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class LoadProfile:
    """The load generator's run facts (see the module doc for where each comes from)."""

    source: str = ""  # the file(s) read, e.g. "inference-perf/config.yaml + profile.yaml"
    api_type: str | None = None  # completion | chat
    streaming: bool | None = None
    ignore_eos: bool | None = None
    model_name: str | None = None
    data_type: str | None = None  # shared_prefix, random, shareGPT, ...
    load_type: str | None = None  # constant | poisson
    stages: tuple[LoadStage, ...] = ()
    shared_prefix: SharedPrefix | None = None  # what ran
    declared_shared_prefix: SharedPrefix | None = None  # what profile.yaml asked for
    request_timeout_s: float | None = None

    @property
    def output_len(self) -> int | None:
        """Tokens every request asked for (shared-prefix workloads), else None."""
        return self.shared_prefix.output_len if self.shared_prefix else None

    def to_profile(self) -> dict[str, Any]:
        """This workload as an inference-perf ``profile.yaml`` mapping."""
        out: dict[str, Any] = {}
        api = {k: v for k, v in (("type", self.api_type), ("streaming", self.streaming))
               if v is not None}
        if api:
            out["api"] = api
        data: dict[str, Any] = {}
        if self.data_type:
            data["type"] = self.data_type
        if self.shared_prefix:
            data["shared_prefix"] = self.shared_prefix.to_dict()
        if data:
            out["data"] = data
        load: dict[str, Any] = {}
        if self.load_type:
            load["type"] = self.load_type
        if self.stages:
            load["stages"] = [s.to_dict() for s in self.stages]
        if self.request_timeout_s is not None:
            load["request_timeout"] = self.request_timeout_s
        if load:
            out["load"] = load
        server = {k: v for k, v in (("model_name", self.model_name),
                                    ("ignore_eos", self.ignore_eos)) if v is not None}
        if server:
            out["server"] = server
        return out


def _int(value: Any, file: str, key: str) -> int | None:
    if value is None or isinstance(value, Mapping):  # a Mapping is a length distribution
        return None
    if isinstance(value, bool):
        raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key) from None
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key)
    return int(number)


def _float(value: Any, file: str, key: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number, got {value!r}", file=file, key=key) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"expected a number, got {value!r}", file=file, key=key)
    return number


def _bool(value: Any, file: str, key: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"expected true or false, got {value!r}", file=file, key=key)


def _mapping(parent: Mapping, key: str, file: str, prefix: str = "") -> Mapping:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", file=file,
                          key=f"{prefix}{key}")
    return value


def _first(data: Mapping, *keys: str) -> tuple[str, Any]:
    for key in keys:
        if data.get(key) is not None:
            return key, data[key]
    return keys[0], None


def parse_shared_prefix(data: Mapping, file: str,
                        prefix: str = "data.shared_prefix.") -> SharedPrefix:
    """Either naming: ``num_unique_system_prompts`` / ``num_groups`` and
    ``num_users_per_system_prompt`` / ``num_prompts_per_group``."""
    k_groups, groups = _first(data, "num_unique_system_prompts", "num_groups")
    k_users, users = _first(data, "num_users_per_system_prompt", "num_prompts_per_group")
    return SharedPrefix(
        num_unique_system_prompts=_int(groups, file, prefix + k_groups),
        num_users_per_system_prompt=_int(users, file, prefix + k_users),
        system_prompt_len=_int(data.get("system_prompt_len"), file, prefix + "system_prompt_len"),
        question_len=_int(data.get("question_len"), file, prefix + "question_len"),
        output_len=_int(data.get("output_len"), file, prefix + "output_len"),
        enable_multi_turn_chat=_bool(data.get("enable_multi_turn_chat"), file,
                                     prefix + "enable_multi_turn_chat"))


def _parse_one(cfg: Mapping, file: str) -> dict[str, Any]:
    """The facts of one profile/config mapping (None when absent)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError("expected a mapping", file=file)
    api, data = _mapping(cfg, "api", file), _mapping(cfg, "data", file)
    load, server = _mapping(cfg, "load", file), _mapping(cfg, "server", file)
    stages_raw = load.get("stages") or []
    if not isinstance(stages_raw, list):
        raise ConfigError("expected a list", file=file, key="load.stages")
    stages = []
    for i, stage in enumerate(stages_raw):
        if not isinstance(stage, Mapping):
            raise ConfigError("expected a mapping", file=file, key=f"load.stages[{i}]")
        stages.append(LoadStage(
            index=i, rate=_float(stage.get("rate"), file, f"load.stages[{i}].rate"),
            duration_s=_float(stage.get("duration"), file, f"load.stages[{i}].duration"),
            concurrency=_int(stage.get("concurrency_level"), file,
                             f"load.stages[{i}].concurrency_level")))
    sp = data.get("shared_prefix")
    if sp is not None and not isinstance(sp, Mapping):
        raise ConfigError("expected a mapping", file=file, key="data.shared_prefix")
    return {
        "api_type": str(api["type"]) if api.get("type") is not None else None,
        "streaming": _bool(api.get("streaming"), file, "api.streaming"),
        "ignore_eos": _bool(server.get("ignore_eos"), file, "server.ignore_eos"),
        "model_name": str(server["model_name"]) if server.get("model_name") else None,
        "data_type": str(data["type"]) if data.get("type") is not None else None,
        "load_type": str(load["type"]) if load.get("type") is not None else None,
        "stages": tuple(stages),
        "shared_prefix": parse_shared_prefix(sp, file) if sp is not None else None,
        "request_timeout_s": _float(load.get("request_timeout"), file, "load.request_timeout"),
    }


def parse_workload(profile: Mapping | None, expanded: Mapping | None, *,
                   profile_file: str = "profile.yaml", expanded_file: str = "config.yaml"
                   ) -> tuple[LoadProfile | None, list[str]]:
    """Merge ``profile.yaml`` (asked for) and inference-perf's ``config.yaml`` (ran): each
    fact from ``config.yaml`` when it has it, else from the profile. Returns the workload
    (None when neither is given) and one warning per disagreement."""
    if profile is None and expanded is None:
        return None, []
    asked = _parse_one(profile, profile_file) if profile is not None else None
    ran = _parse_one(expanded, expanded_file) if expanded is not None else None
    warnings: list[str] = []
    merged: dict[str, Any] = {}
    for key in ("api_type", "streaming", "ignore_eos", "model_name", "data_type", "load_type",
                "stages", "request_timeout_s"):
        a = asked.get(key) if asked else None
        r = ran.get(key) if ran else None
        merged[key] = r if r not in (None, ()) else a
        if a not in (None, ()) and r not in (None, ()) and a != r:
            warnings.append(f"{expanded_file} {key}={_show(r)} (what ran) but {profile_file} "
                            f"says {_show(a)}; using {expanded_file}")
    sp_asked = asked.get("shared_prefix") if asked else None
    sp_ran = ran.get("shared_prefix") if ran else None
    shared = sp_asked
    if sp_ran is not None:
        # config.yaml dumps every field the running release knew: a key it lacks (e.g.
        # enable_multi_turn_chat in old releases) was not applied, so it stays unknown.
        shared = sp_ran
        for k, v in (sp_ran.__dict__.items() if sp_asked is not None else ()):
            a = getattr(sp_asked, k)
            if v is not None and a is not None and v != a:
                warnings.append(
                    f"{expanded_file} data.shared_prefix.{k}={v} (what the load generator ran) "
                    f"but {profile_file} says {a}; using {expanded_file} (inference-perf "
                    "releases without the num_unique_system_prompts / "
                    "num_users_per_system_prompt aliases ignore those keys and run their "
                    "defaults)")
            elif v is None and a is not None:
                warnings.append(
                    f"{profile_file} sets data.shared_prefix.{k}={a} but {expanded_file} has no "
                    "such key: the release that ran did not apply it")
    source = " + ".join(f for f, d in ((expanded_file, expanded), (profile_file, profile))
                        if d is not None)
    return LoadProfile(source=source, shared_prefix=shared,
                    declared_shared_prefix=sp_asked if sp_asked != shared else None,
                    **merged), warnings


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v.to_dict() if hasattr(v, "to_dict") else v)
                               for v in value) + "]"
    return str(value)


# -- native per-request report -------------------------------------------------------


@dataclass
class NativeRequest:
    """One record of ``per_request_lifecycle_metrics.json``, as read (times in s)."""

    position: int  # in the file
    start_s: float | None = None
    end_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None  # the client's count
    server_output_tokens: int | None = None  # usage.completion_tokens, when sent
    max_tokens: int | None = None  # from the request body
    ignore_eos: bool | None = None  # from the request body
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None
    has_error: bool = False
    stage_id: int | None = None
    problems: list[str] = field(default_factory=list)  # malformed fields (kept, reported)


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float; None for missing, booleans, text and NaN/inf."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = finite_number(value)
    return int(number) if number is not None and number == int(number) else None


def _times(value: Any) -> list[float] | None:
    if not isinstance(value, list):
        return None
    out = [finite_number(v) for v in value]
    return None if any(v is None for v in out) else out  # type: ignore[misc]


def parse_native_record(record: Any, position: int) -> NativeRequest:
    """One per-request record, either ``info`` shape (module doc). Never raises: malformed
    fields are left None and described in ``problems``."""
    row = NativeRequest(position=position)
    if not isinstance(record, Mapping):
        row.problems.append(f"record is a {type(record).__name__}, not an object")
        return row
    row.start_s = finite_number(record.get("start_time"))
    row.end_s = finite_number(record.get("end_time"))
    if row.start_s is None:
        row.problems.append("no numeric start_time")
    if row.end_s is None:
        row.problems.append("no numeric end_time")
    error = record.get("error")
    if error is not None:
        row.has_error = True
        if isinstance(error, Mapping):
            row.error = ": ".join(str(error[k]) for k in ("error_type", "error_msg")
                                  if error.get(k))[:300] or "error"
        else:
            row.error = str(error)[:300]
    stage = record.get("stage_id")
    row.stage_id = _count(stage) if stage is not None else None
    info = record.get("info")
    info = info if isinstance(info, Mapping) else {}
    response = info.get("response_metrics")
    response = response if isinstance(response, Mapping) else None
    request_metrics = info.get("request_metrics")
    computed = record.get("computed_metrics")
    computed = computed if isinstance(computed, Mapping) else {}
    text = request_metrics.get("text") if isinstance(request_metrics, Mapping) else None
    row.input_tokens = _count(info.get("input_tokens"))
    if row.input_tokens is None and isinstance(text, Mapping):
        row.input_tokens = _count(text.get("input_tokens"))
    if row.input_tokens is None:
        row.input_tokens = _count(computed.get("input_tokens"))
    holder = response if response is not None else info
    row.output_tokens = _count(holder.get("output_tokens"))
    if row.output_tokens is None:
        row.output_tokens = _count(computed.get("output_tokens"))
    usage = holder.get("server_usage")
    if isinstance(usage, Mapping):
        row.server_output_tokens = _count(usage.get("completion_tokens"))
        if row.server_output_tokens is None:
            row.server_output_tokens = _count(usage.get("output_tokens"))
    times = None
    for key in ("output_token_times", "chunk_times"):
        raw = holder.get(key)
        if raw:
            times = _times(raw)
            if times is None:
                row.problems.append(f"non-numeric {key}")
            break
    row.token_times_s = times or []
    body = record.get("request")
    if isinstance(body, str) and body:
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            body = None
    if isinstance(body, Mapping):
        row.max_tokens = _count(body.get("max_tokens"))
        eos = body.get("ignore_eos")
        row.ignore_eos = eos if isinstance(eos, bool) else None
    return row
