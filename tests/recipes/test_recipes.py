"""The bundled recipes: valid run configs whose planner estimate fits the setup they name."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.config import RunConfig, load_config
from lorakit.errors import ConfigError
from lorakit.plan.presets import GPUS, PRESETS
from lorakit.recipes import (RECIPES, copy_recipe, fits_setup, list_recipes, planner_model,
                             recipe_config, recipe_estimate)

NAMES = list(RECIPES)


def test_every_bundled_file_is_listed_and_packaged():
    files = {p.name[:-5] for p in resources.files("lorakit.recipes").iterdir()
             if p.name.endswith(".yaml")}
    assert files == set(RECIPES)
    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "recipes/*.yaml" in data["tool"]["setuptools"]["package-data"]["lorakit"]
    # the setups, each by the planner's names
    assert {(r.gpu, r.gpus) for r in RECIPES.values()} >= {
        ("RTX 4090 24GB", 1), ("A100 80GB", 1), ("A100 80GB", 2), ("RTX 4060 Ti 16GB", 1),
        (None, 1)}
    assert all(r.gpu is None or r.gpu in {g.label for g in GPUS} for r in RECIPES.values())


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_a_valid_run_config(name, tmp_path):
    """Each recipe goes through the run-config loader (as `lorakit train FILE` reads it)."""
    path = copy_recipe(name, tmp_path / "run.yaml")
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg == recipe_config(name)
    assert planner_model(cfg.model) in PRESETS or cfg.model == "smollm2-135m-instruct"
    if RECIPES[name].gpus > 1:
        assert cfg.train.strategy == "fsdp"
    if RECIPES[name].gpu is None:
        assert cfg.train.precision == "fp32"
    assert cfg.data.train and cfg.data.eval


@pytest.mark.parametrize("name", NAMES)
def test_recipe_fits_its_stated_setup(name):
    """The planner's estimate says the run fits the card(s) or RAM the recipe names."""
    recipe = RECIPES[name]
    est = recipe_estimate(name)
    cfg = recipe_config(name)
    assert est.method == cfg.method
    assert est.settings["seq_len"] == cfg.data.max_length
    assert est.settings["batch_size"] == cfg.train.batch_size
    assert est.settings["grad_checkpointing"] == cfg.train.grad_checkpointing
    if recipe.gpu is None:
        assert est.settings["device"] == "cpu"
        assert est.memory_bytes["total"] <= recipe.ram_gib * 2**30
    else:
        assert f"{recipe.gpus}x {recipe.gpu}" in est.fits or any(
            f"{n}x {recipe.gpu}" in est.fits for n in range(1, recipe.gpus))
        if recipe.gpus > 1:  # needs the sharding: one card is not enough
            assert f"1x {recipe.gpu}" not in est.fits
    assert fits_setup(recipe, est)


@pytest.mark.parametrize("name", [n for n in NAMES if RECIPES[n].gpu])
def test_listed_estimate_command_gives_the_listed_numbers(name, tmp_path, capsys):
    """The `lorakit estimate` line printed for a recipe reproduces its listed memory."""
    row = next(r for r in list_recipes() if r["name"] == name) if name == NAMES[0] else None
    path = copy_recipe(name, tmp_path)
    line = f"lorakit estimate --from-config {path}"
    cfg = recipe_config(name)
    argv = line.split()[1:] + ["--model", planner_model(cfg.model), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    est = recipe_estimate(name)
    assert out["memory_gib"]["total"] == est.memory_gib()["total"]
    assert out["fits"] == est.fits
    if row is not None:
        assert row["estimate_command"] == (f"lorakit estimate --from-config {name}.yaml --model "
                                           f"{planner_model(cfg.model)}")


def test_cli_lists_and_copies(tmp_path, capsys):
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES and all(r["fits_setup"] for r in rows)
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert all(n in text for n in NAMES) and "lorakit estimate --from-config" in text

    dest = tmp_path / "run.yaml"
    assert main(["recipes", "copy", "phi3-mini-lora-16gb", str(dest)]) == 0
    assert "microsoft/Phi-3-mini-4k-instruct" in dest.read_text()
    dest.write_text("# mine\n")
    assert main(["recipes", "copy", "smollm2-135m-cpu", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text() == "# mine\n"  # refused: untouched
    assert main(["recipes", "copy", "smollm2-135m-cpu", str(dest), "--force"]) == 0
    assert load_config(dest).model == "smollm2-135m-instruct"
    assert main(["recipes", "copy", "llama3-8b-qlora", str(tmp_path / "x.yaml")]) == 2
    assert "did you mean 'llama3-8b-qlora-24gb'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no preset"):
        planner_model("someone/unknown-7b")
