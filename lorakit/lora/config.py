"""LoraConfig: the settings of one adapter, with PEFT's field names and meanings.

Field names match ``peft.LoraConfig`` so a PEFT user needs no translation and so
``adapter_config.json`` files round-trip between PEFT and lorakit.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorakit.errors import ConfigError, did_you_mean

ALL_LINEAR = "all-linear"

# PEFT features that change the maths; an adapter using them cannot be loaded faithfully.
_PEFT_UNSUPPORTED = {
    "lora_bias": False, "use_qalora": False, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
}


# `lora.init` in a run config -> PEFT's init_lora_weights
RUN_CONFIG_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
                    "loftq": "loftq"}
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(value) -> bool | str:
    """Validate a PEFT ``init_lora_weights`` value lorakit can compute.

    Raises:
        ValueError: anything else (the message lists the accepted values).
    """
    if value is True or value is False:
        return value
    if isinstance(value, str) and (value in ("gaussian", "pissa", "olora", "loftq")
                                   or _PISSA_NITER.fullmatch(value)):
        return value
    raise ValueError(f"init_lora_weights must be true, false, 'gaussian', 'pissa', "
                     f"'pissa_niter_K', 'olora' or 'loftq' (got {value!r})")



class LoraConfig(BaseModel):
    """Settings of one LoRA adapter (PEFT's names and meanings).

    Attributes:
        r: rank of the update ``B @ A``.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter's input during training.
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``), a regex matched
            against the full module path, or ``"all-linear"`` (every linear layer except the
            output head).
        bias: which biases train and are saved with the adapter: ``none``, ``lora_only``
            (biases of the adapted layers) or ``all``.
        use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (Liu et al. 2024), a learned per-row magnitude.
        modules_to_save: modules (by name suffix) trained in full and saved with the adapter,
            e.g. ``["lm_head"]``.
        layers_to_transform: only adapt these decoder-layer indices.
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha (PEFT semantics:
            the key is a regex matched against the end of the module path).
        init_lora_weights: how A and B start (PEFT's values): ``True`` (A Kaiming, B zero),
            ``"gaussian"``, ``"pissa"`` / ``"pissa_niter_K"``, ``"olora"``, ``"loftq"`` (4-bit
            base); see ``lorakit.lora.init``.
        loftq_config: PEFT's ``{"loftq_bits": 4, "loftq_iter": 1}`` (the only values lorakit
            supports: the 4-bit base keeps its own codes).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str] = ALL_LINEAR
    bias: Literal["none", "lora_only", "all"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[list[int]] = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    loftq_config: dict = Field(default_factory=dict)

    @field_validator("init_lora_weights")
    @classmethod
    def _init(cls, v):
        return check_init(v)

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"r must be a positive integer (got {v}); typical values are 8, 16, 32")
        return v

    @field_validator("lora_alpha")
    @classmethod
    def _positive_alpha(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"lora_alpha must be > 0 (got {v}); a common choice is 2 * r")
        return v

    @field_validator("lora_dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1) (got {v})")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, str):
            if v != ALL_LINEAR:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise ValueError(f"target_modules {v!r} is not a valid regex: {exc}") from None
        elif not v:
            raise ValueError("target_modules is empty; name some layers or use 'all-linear'")
        return v

    @field_validator("layers_to_transform", mode="before")
    @classmethod
    def _layers(cls, v):
        return [v] if isinstance(v, int) else v

    @classmethod
    def create(cls, **kwargs) -> "LoraConfig":
        """Build a config, turning pydantic's errors into one readable :class:`ConfigError`."""
        from pydantic import ValidationError

        unknown = [k for k in kwargs if k not in cls.model_fields]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"unknown LoraConfig field {k!r}{did_you_mean(k, cls.model_fields)}")
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(exc, "LoraConfig")) from None

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json") -> "LoraConfig":
        """Read a PEFT ``adapter_config.json`` dict.

        Raises:
            ConfigError: not a LoRA adapter, or it uses a PEFT feature lorakit cannot reproduce.
        """
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(f"{source}: peft_type is {peft_type!r}; lorakit loads LoRA adapters only")
        for key, neutral in _PEFT_UNSUPPORTED.items():
            if data.get(key, neutral) not in (neutral, {}, []):
                raise ConfigError(f"{source}: {key}={data[key]!r} is not supported by lorakit")
        init = data.get("init_lora_weights", True)
        if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda")):
            raise ConfigError(
                f"{source}: init_lora_weights={init!r}: this adapter was saved without "
                f"conversion, so its weights only fit the residual base its initialisation made, "
                f"not the original model. Re-save it with PEFT's save_pretrained(..., "
                f"path_initial_model_for_weight_conversion=...) (lorakit converts when it saves)")
        fields = {k: v for k, v in data.items() if k in cls.model_fields and v is not None}
        # the file holds the weights: how they were first initialised no longer matters
        fields.pop("init_lora_weights", None)
        fields.pop("loftq_config", None)
        if isinstance(fields.get("target_modules"), list):  # PEFT stores a set: order is noise
            fields["target_modules"] = sorted(fields["target_modules"])
        return cls.create(**fields)

    def scaling_for(self, module_path: str, r: int | None = None) -> float:
        """The factor the update of ``module_path`` is multiplied by."""
        r = r if r is not None else self.rank_for(module_path)
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_for(self, module_path: str) -> int:
        return _pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)


def _pattern_value(patterns: dict, module_path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _format_validation_error(exc, what: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or what
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{what}.{loc}: {msg}")
    return "; ".join(lines)
