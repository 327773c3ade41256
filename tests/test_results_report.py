"""benchmarks/RESULTS.md is made from the records, and the shipped recipes are what those
records ran: the report cannot drift from its data, nor ``cl-sulora reproduce`` from the report."""

from __future__ import annotations

import json

import pytest

from benchmarks.accuracy import tables
from cl_sulora.runner.config import resolve_config
from cl_sulora.runner.recipes import available_recipes, load_recipe
from cl_sulora.runner.records import config_differences

#: Keys a record may differ in from its recipe's config: where the data, weights and outputs
#: were on the machine that ran it (the text backbone given as the local copy of MiniLM-L6).
MACHINE_KEYS = ("data.data_root", "out", "device", "backbone.name", "backbone.weights",
                "backbone.kwargs", "preset_file")


def test_results_tables_are_the_records():
    text = tables.RESULTS.read_text()
    assert tables.render(text) == text, "run python -m benchmarks.accuracy.tables"
    assert len(text.splitlines()) <= 340  # a report, not a lab notebook


@pytest.mark.parametrize("name", available_recipes("tables"))
def test_each_recipe_is_what_its_recorded_runs_ran(name):
    recipe = load_recipe(name)
    paths = tables.record_paths(recipe)
    assert len(paths) == len(recipe.runs())
    for (strategy, seed, overrides), path in zip(recipe.runs(), paths, strict=True):
        record = json.loads(path.read_text())
        assert (record["strategy"], record["seed"]) == (strategy, seed)
        config = resolve_config(recipe.spec.benchmark, strategy, {**overrides, "device": "cpu"})
        differing = [
            d for d in config_differences(record["config"], config.model_dump(mode="json"))
            if not d.startswith(MACHINE_KEYS)
            and ": None ->" not in d  # a key added since, at its default
            and not d.startswith("data: None")
        ]
        assert not differing, f"{path.name}: {differing}"


def test_a_training_setting_a_record_predates_counts_as_its_default():
    now = {"training": {"lr": 0.1, "lr_milestones": [], "first_lr": None}, "seed": 0}
    assert config_differences({"training": {"lr": 0.1}, "seed": 0}, now) == []
    assert config_differences({"training": {"lr": 0.1}, "seed": 0},
                              {**now, "training": {"lr": 0.1, "lr_milestones": [4]}}) == [
        "training.lr_milestones: [] -> [4]"]
    assert config_differences({"training": {"lr": 0.1}}, {"training": {"lr": 0.1}, "seed": 1}
                              ) == ["seed: None -> 1"]


def test_each_table_shows_its_accuracy_against_memory_plot(tmp_path, monkeypatch):
    text = tables.RESULTS.read_text()
    for name in available_recipes("tables"):
        assert f"](results/accuracy/tables/{name}__memory.png)" in text
        assert (tables.PLOTS / f"{name}__memory.png").is_file()
    monkeypatch.setattr(tables, "PLOTS", tmp_path)
    tables.plots(load_recipe("cifar100-20-fusion"))
    assert (tmp_path / "cifar100-20-fusion__memory.png").stat().st_size > 0
