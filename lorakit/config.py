"""Run configuration: one typed, validated object handed to a training recipe.

A run is described by a YAML file plus ``a.b=value`` overrides from the command line.
Unknown keys and wrong types are errors that name the key and suggest the nearest valid one;
the resolved config is written to the run folder so later commands need nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorakit.errors import ConfigError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"
_MODEL_KEYS = ["name", "device_map"]  # `model:` written as a mapping
# the preference recipes (lorakit/train/dpo.py, docs/dpo.md); their settings are the dpo: section
PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")

# names users bring from PEFT / TRL / transformers -> ours
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_rslora": "rslora", "use_dora": "dora", "learning_rate": "lr",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler", "warmup_ratio": "warmup", "warmup_steps": "warmup",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "gradient_checkpointing": "grad_checkpointing", "max_seq_length": "max_length",
    "max_seq_len": "max_length", "seq_len": "max_length", "output": "output_dir",
    "train_file": "train", "eval_file": "eval", "model_name_or_path": "model",
}


def _suggest(name: str, valid: list[str]) -> str:
    synonym = _SYNONYMS.get(name)
    if synonym in valid:
        return f" (did you mean {synonym!r}?)"
    return did_you_mean(name, valid)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(_Section):
    """Adapter settings (see ``lorakit.LoraConfig`` for the meaning of each)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[list[str], str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "lora_only", "all"] = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[list[int]] = None
    # how A and B start (PEFT's init_lora_weights; docs/lora.md): pissa / olora move part of the
    # base into the adapter, loftq fits the adapter to a 4-bit base's quantization error
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    # LoRA+: the B matrices' learning rate as a multiple of A's (train.lr); null = plain LoRA
    lr_ratio: Optional[float] = Field(None, gt=0)

    def to_lora_config(self):
        from lorakit.lora.config import LoraConfig
        from lorakit.lora.config import RUN_CONFIG_INITS

        return LoraConfig.create(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self.target_modules, use_rslora=self.rslora, use_dora=self.dora,
            bias=self.bias, modules_to_save=self.modules_to_save,
            layers_to_transform=self.layers_to_transform,
            init_lora_weights=RUN_CONFIG_INITS[self.init])


class QuantizationSection(_Section):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None


class ReplaySection(_Section):
    """Rehearsal against forgetting (``lorakit/data/replay.py``, docs/eval.md): general
    examples mixed into the training data at ``fraction`` of its tokens."""

    fraction: float = Field(0.0, ge=0, lt=1)  # replay tokens / all training tokens; 0 = off
    # null: the base model's own greedy answers to lorakit's bundled general instructions
    # (generated once, cached); a path: your own replay file (any training format)
    file: Optional[str] = None
    # kl: match the frozen base's next-token distribution at every position of the replay
    # examples (self-distillation: KL(base || tuned), the forgetting probe's own measure);
    # ce: train on the replay answers as on any example (cross-entropy on the answer tokens);
    # null: kl for adapters (lora, qlora), ce for method full (which keeps no frozen base)
    loss: Optional[Literal["ce", "kl"]] = None

    def loss_for(self, method: str) -> str:
        """The replay loss a run of ``method`` uses (``loss``, or its default)."""
        return self.loss or ("ce" if method == "full" else "kl")


class DataSection(_Section):
    train: Optional[str] = None
    eval: Optional[str] = None
    eval_fraction: Optional[float] = Field(None, gt=0, lt=1)
    format: str = "auto"
    max_length: int = Field(1024, gt=8)
    packing: bool = True
    train_on: Literal["last_turn", "all_assistant", "everything"] = "all_assistant"
    replay: ReplaySection = Field(default_factory=ReplaySection)


class TrainSection(_Section):
    epochs: float = Field(3, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(0.03, ge=0)  # < 1: a fraction of the steps; >= 1: a step count
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    # keep the tensors saved for backward in pinned CPU memory (CUDA only; docs/training.md)
    activation_offload: bool = False
    # adamw: torch's AdamW (fp32 moments, 8 bytes/param); adamw8bit / paged_adamw8bit:
    # bitsandbytes' block-wise 8-bit AdamW (~2 bytes/param; paged: CUDA only). docs/training.md
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    seed: int = 0
    eval_every: Optional[int] = Field(None, gt=0)
    save_every: Optional[int] = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    early_stopping_patience: Optional[int] = Field(None, gt=0)
    log_every: int = Field(1, gt=0)
    # tensorboard, wandb (offline without WANDB_API_KEY), mlflow (RUN/mlruns file store by
    # default): the metrics.jsonl records; wandb / mlflow also get the config and the adapter
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    # NEFTune: noise of this strength on the input embeddings while training (null = off)
    neftune_alpha: Optional[float] = Field(None, gt=0)
    # several processes (torchrun / --nproc): replicate the model (ddp) or shard it (fsdp);
    # batch_size is per process. See docs/distributed.md.
    strategy: Literal["ddp", "fsdp"] = "ddp"


class DpoSection(_Section):
    """Preference optimisation settings (``method: dpo | orpo | simpo | kto``; docs/dpo.md)."""

    # dpo / kto: how far the policy may move from the reference; orpo: lambda, the weight of
    # the odds-ratio term; simpo: the reward scale
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    # cDPO: the share of pairs assumed mislabelled (sigmoid loss only)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0)  # + weight x NLL of the chosen answers (RPO)
    precompute_reference: bool = False  # reference log-probs once, cached in the run folder
    simpo_gamma: float = Field(0.5, ge=0)  # simpo: the target reward margin (TRL's name)
    desirable_weight: float = Field(1.0, gt=0)  # kto: weight of the desirable examples' loss
    undesirable_weight: float = Field(1.0, gt=0)  # kto: ... and of the undesirable ones'

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only (loss is "
                             f"{self.loss!r}); set dpo.label_smoothing=0 or dpo.loss=sigmoid")
        return self


class EvalSection(_Section):
    """What ``lorakit train`` reports when it finishes (see docs/eval.md).

    With ``data.eval`` set and ``after_train`` on, a LoRA / QLoRA run ends with the
    base-vs-tuned table of ``lorakit eval`` on the held-out file (the same model, adapters
    off and on) and writes the report to ``RUN/eval/``.
    """

    after_train: bool = True
    metric: str = "exact"  # any `lorakit eval --metric` name: exact, json, rouge-l, sql, python:...
    sql_db: Optional[str] = None  # the SQLite file of the `sql` metric
    limit: Optional[int] = Field(50, gt=0)  # held-out examples generated for (None = all)
    max_new_tokens: int = Field(128, gt=0)
    forgetting: bool = True  # KL / perplexity change on the bundled general-text probe
    probe_limit: Optional[int] = Field(32, gt=0)
    # the prompt baseline: the base with K data.train examples before each question (row
    # base-<K>shot); null = 3 when data.train is set, 0 = off (lorakit/eval/fewshot.py)
    few_shot: Optional[int] = Field(None, ge=0)
    few_shot_select: Literal["first", "random", "similar"] = "similar"


class RunConfig(_Section):
    """Everything a training run needs. See ``examples/`` for complete files."""

    model: str = DEFAULT_MODEL
    # written `model: {name: NAME, device_map: auto}` (or the override model.device_map=auto);
    # kept beside `model` so `cfg.model` stays the model spec. See docs/distributed.md.
    device_map: Optional[Union[Literal["auto", "balanced", "sequential"], dict[str, Union[int, str]]]] = None
    # dpo: preference optimisation with a LoRA adapter; QLoRA when `quantization` is given
    # orpo / simpo: reference-free preference objectives on pairs; kto: unpaired good/bad answers
    method: Literal["lora", "qlora", "full", "dpo", "orpo", "simpo", "kto"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    # dpo: start from this (SFT) adapter folder; it is also the frozen reference
    init_adapter: Optional[str] = None
    output_dir: Optional[str] = None
    resume: bool = False

    @model_validator(mode="after")
    def _init_adapter_needs_dpo(self):
        if self.init_adapter is not None and self.method not in PREFERENCE_METHODS:
            raise ValueError(f"init_adapter is used by method: dpo, orpo, simpo or kto (method "
                             f"is {self.method!r})")
        return self

    @model_validator(mode="after")
    def _lr_ratio_needs_an_adapter(self):
        if self.lora.lr_ratio is not None and self.method == "full":
            raise ValueError("lora.lr_ratio (LoRA+) sets the adapter's B matrices' learning "
                             "rate; method: full trains no adapter")
        return self

    @model_validator(mode="after")
    def _preference_settings_fit_the_method(self):
        d, m = self.dpo, self.method
        if m not in PREFERENCE_METHODS or m == "dpo":
            return self
        if d.loss != "sigmoid":
            raise ValueError(f"dpo.loss chooses DPO's loss; method {m} has its own (set "
                             f"dpo.loss=sigmoid or method=dpo)")
        if d.precompute_reference:
            raise ValueError(f"dpo.precompute_reference: method {m} "
                             + ("has no reference model" if m != "kto" else
                                "scores mismatched pairs that change with every batch")
                             + "; set dpo.precompute_reference=false")
        if d.label_smoothing and m != "simpo":
            raise ValueError(f"dpo.label_smoothing applies to method dpo and simpo, not {m}")
        if d.sft_weight and m != "simpo":
            raise ValueError("dpo.sft_weight: method orpo always adds the chosen answers' NLL "
                             "(weight 1)" if m == "orpo" else
                             "dpo.sft_weight applies to paired methods (dpo, simpo), not kto")
        return self

    @model_validator(mode="after")
    def _replay_needs_sft(self):
        if self.data.replay.fraction and self.method == "kto":
            raise ValueError("data.replay joins the SFT term of a paired preference objective "
                             "(method dpo, orpo or simpo); method kto has none: set "
                             "data.replay.fraction=0, or replay in the SFT run KTO starts from")
        if self.data.replay.fraction and self.data.replay.loss == "kl" and self.method == "full":
            raise ValueError("data.replay.loss=kl matches the frozen base model's distribution, "
                             "which method full does not keep (it trains the base itself): "
                             "use data.replay.loss=ce, or method lora / qlora")
        return self

    @model_validator(mode="after")
    def _init_fits_the_base(self):
        if self.lora.init == "loftq" and not self.quantized:
            raise ValueError("lora.init: loftq initialises the adapter from a 4-bit base's "
                             "quantization error; use it with method: qlora")
        if self.lora.init in ("pissa", "olora") and self.quantized:
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights, which a "
                             f"4-bit base cannot take; with QLoRA use lora.init: loftq")
        if self.lora.init in ("pissa", "olora") and self.method in ("dpo", "kto"):
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights, but DPO's "
                             f"reference is the base itself; use it for the SFT run instead")
        return self

    @property
    def quantized(self) -> bool:
        """Whether the base is loaded in 4 bits: ``method: qlora``, or ``method: dpo`` with a
        ``quantization`` section given."""
        return self.method == "qlora" or (self.method in PREFERENCE_METHODS
                                           and "quantization" in self.model_fields_set)

    @model_validator(mode="before")
    @classmethod
    def _model_section(cls, data: Any) -> Any:
        """``model: {name, device_map}`` -> ``model`` (the spec) and ``device_map``."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            section = dict(data["model"])
            unknown = [k for k in section if k not in _MODEL_KEYS]
            if unknown:
                raise ValueError(f"unknown key 'model.{unknown[0]}'"
                                 f"{did_you_mean(unknown[0], _MODEL_KEYS)}; valid keys under "
                                 f"model: {', '.join(_MODEL_KEYS)}")
            data = {**data, "model": section.get("name", DEFAULT_MODEL)}
            if "device_map" in section:
                data["device_map"] = section["device_map"]
        return data

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model is empty; use an alias such as 'smollm2-135m-instruct', a "
                             "folder, a .gguf file or a hub id")
        return v

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        name = Path(self.model).stem if self.model.endswith(".gguf") else self.model.split("/")[-1]
        return Path("runs") / f"{name}-{self.method}-{time.strftime('%Y%m%d-%H%M%S')}"

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if self.method in PREFERENCE_METHODS and not self.quantized:
            data.pop("quantization")  # written, it would turn the run into QLoRA when read back
        if self.method not in PREFERENCE_METHODS:
            data.pop("dpo")
            data.pop("init_adapter")
        device_map = data.pop("device_map", None)
        if device_map is not None:
            data["model"] = {"name": data["model"], "device_map": device_map}
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------- parsing
def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "lora.r=8"]`` -> ``{"train": {"lr": 1e-4}, "lora": {"r": 8}}``.

    Values are parsed as YAML scalars/flow collections (``8`` is an int, ``[q_proj, v_proj]``
    a list, ``null`` None).
    """
    result: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from None
        node = result
        parts = key.split(".")
        # `model=NAME` together with `model.device_map=auto`: the name goes to model.name
        if parts == ["model"] and isinstance(result.get("model"), dict):
            parts = ["model", "name"]
        elif parts[0] == "model" and isinstance(result.get("model"), str):
            result["model"] = {"name": result["model"]}
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return result


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get(key), str):
            out[key] = {"name": out[key]}  # `model: NAME` then `model.device_map=auto`
        elif key == "model" and isinstance(value, str) and isinstance(out.get(key), dict):
            value = {**out[key], "name": value}  # `model: {..}` then `model=OTHER`
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names at the location of an error (for 'did you mean')."""
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def format_errors(exc: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            hint = _suggest(str(loc[-1]), _fields_at(model_cls, loc))
            valid = ", ".join(_fields_at(model_cls, loc))
            lines.append(f"{source}: unknown key {key!r}{hint}; valid keys here: {valid}")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}{got_text}")
    return "\n".join(lines)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate.

    Args:
        path: YAML file (None: start from ``base`` or the defaults).
        overrides: dotted ``key=value`` strings, applied after the file.
        base: a dict to start from (used for the bundled example).

    Raises:
        ConfigError: unreadable YAML, unknown keys (with the nearest valid name), wrong types.
    """
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of keys (model, method, lora, data, train...)")
        data = _deep_merge(data, loaded)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        source = f"{source} + overrides" if path else "overrides"
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, RunConfig, source)) from None
