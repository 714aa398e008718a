"""Bundled run configs for common setups (``lorakit recipes``), each with its live estimate.

A recipe is a plain ``lorakit train`` config (``<name>.yaml`` in this package) plus the setup it
is meant for: the card and how many of them, or a CPU and its RAM. Its memory line is computed
by the planner (``lorakit.plan``) when listed, never written down, so it follows the planner.
The model ids are Hugging Face ids of models the planner has presets for
(``lorakit.plan.presets``); the planner is asked about the preset (no download).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lorakit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Recipe:
    """One bundled recipe.

    Attributes:
        name: the file stem (``lorakit recipes copy NAME``).
        title: one line for the listing.
        gpu: the card's label as the planner writes it (``"RTX 4090 24GB"``), None for a CPU.
        gpus: how many of those cards (several: FSDP, ``lorakit train FILE --nproc N``).
        ram_gib: for a CPU recipe, the RAM it is meant for.
    """

    name: str
    title: str
    gpu: str | None
    gpus: int = 1
    ram_gib: float | None = None

    @property
    def setup(self) -> str:
        return f"{self.gpus}x {self.gpu}" if self.gpu else f"CPU, {self.ram_gib:g} GB RAM"


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("llama3-8b-qlora-24gb", "Llama-3-8B QLoRA on a 24 GB card", "RTX 4090 24GB"),
    Recipe("mistral-7b-lora-80gb", "Mistral-7B LoRA on one 80 GB card", "A100 80GB"),
    Recipe("llama3-70b-qlora-fsdp-2x80gb", "Llama-3-70B QLoRA on 2x80 GB with FSDP",
           "A100 80GB", gpus=2),
    Recipe("phi3-mini-lora-16gb", "Phi-3-mini LoRA on a 16 GB card", "RTX 4060 Ti 16GB"),
    Recipe("smollm2-135m-cpu", "SmolLM2-135M LoRA on a CPU", None, ram_gib=8),
]}


def get_recipe(name: str) -> Recipe:
    """Raises: ConfigError: no recipe of that name (the message lists them)."""
    if name not in RECIPES:
        raise ConfigError(f"no recipe named {name!r}{did_you_mean(name, RECIPES)}; recipes: "
                          f"{', '.join(RECIPES)} (`lorakit recipes` lists them)")
    return RECIPES[name]


def recipe_text(name: str) -> str:
    """The recipe's YAML, as bundled."""
    get_recipe(name)
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text()


def recipe_config(name: str):
    """The recipe read by the run-config loader (``lorakit.config.load_config``), so it is
    validated exactly as ``lorakit train`` validates it."""
    from lorakit.config import load_config

    with resources.as_file(resources.files(__name__).joinpath(f"{get_recipe(name).name}.yaml")) as path:
        return load_config(path)


def planner_model(model: str) -> str:
    """The planner's name for a run config's model: a preset name or alias as is, a Hugging
    Face id of a preset as that preset.

    Raises:
        ConfigError: the planner has no preset for the model.
    """
    from lorakit.plan.presets import ALIAS_PRESETS, PRESETS

    key = model.lower()
    if key in PRESETS or key in ALIAS_PRESETS:
        return key
    for preset in PRESETS.values():
        if preset.hub_id.lower() == key:
            return preset.name
    raise ConfigError(f"the planner has no preset for model {model!r}; presets: "
                      f"{', '.join(f'{p.name} ({p.hub_id})' for p in PRESETS.values())}")


def recipe_estimate(name: str):
    """The planner's :class:`~lorakit.plan.estimate.Estimate` of the recipe, on the device it
    is meant for (GPU, or CPU for a CPU recipe), through the same call ``lorakit train`` makes
    before a run (``lorakit.plan.preflight.estimate_run``)."""
    import torch

    from lorakit.plan.preflight import estimate_run

    recipe = get_recipe(name)
    cfg = recipe_config(name)
    cfg = cfg.model_copy(update={"model": planner_model(cfg.model)})
    device = torch.device("cuda" if recipe.gpu else "cpu")
    precision = cfg.train.precision if cfg.train.precision != "auto" else (
        "bf16" if recipe.gpu else "fp32")
    return estimate_run(cfg, device, precision)


def fits_setup(recipe: Recipe, est) -> bool:
    """Whether the planner says the run fits the recipe's setup: for cards, ``est.fits`` names
    that card with at most ``recipe.gpus`` of them; for a CPU, the total is within its RAM."""
    if recipe.gpu is None:
        return est.memory_bytes["total"] <= recipe.ram_gib * 2**30
    for entry in est.fits:
        count, _, label = entry.partition("x ")
        if label == recipe.gpu and int(count) <= recipe.gpus:
            return True
    return False


def estimate_command(name: str, file: str | None = None) -> str:
    """The ``lorakit estimate`` line that gives the listed numbers for a copy of the recipe."""
    cfg = recipe_config(name)
    line = f"lorakit estimate --from-config {file or name + '.yaml'}"
    model = planner_model(cfg.model)
    if model != cfg.model.lower():
        line += f" --model {model}"
    if get_recipe(name).gpu is None:
        line += " --measure"  # lorakit estimate counts CPU memory when it measures on a CPU
    return line


def list_recipes() -> list[dict]:
    """Every recipe with its estimate: ``[{"name", "title", "setup", "model", "method",
    "memory_gib", "fits_setup", "fits", "estimate_command"}]``."""
    rows = []
    for recipe in RECIPES.values():
        cfg = recipe_config(recipe.name)
        est = recipe_estimate(recipe.name)
        rows.append({"name": recipe.name, "title": recipe.title, "setup": recipe.setup,
                     "model": cfg.model, "method": cfg.method,
                     "memory_gib": est.memory_gib()["total"],
                     "per_gpu": recipe.gpu is not None, "fits_setup": fits_setup(recipe, est),
                     "fits": est.fits, "estimate_command": estimate_command(recipe.name)})
    return rows


def copy_recipe(name: str, dest, *, force: bool = False) -> Path:
    """Write recipe ``name`` to ``dest`` (a file, or a folder to put ``NAME.yaml`` in).

    Raises:
        ConfigError: no such recipe, or ``dest`` exists and ``force`` is False.
    """
    from lorakit.lora.io import atomic_write_bytes

    text = recipe_text(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, text.encode())
    return dest
