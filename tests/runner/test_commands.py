"""The commands around a run: ``reproduce`` (recipes), ``eval`` (a checkpoint, no training),
``--loggers``, the single run's report, and a quiet ``--help``/``list``."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from cl_sulora.runner import cli, loggers, loop, recipes, reproduce
from cl_sulora.runner.cli import build_parser, overrides_from
from cl_sulora.runner.config import resolve_config
from cl_sulora.runner.recipes import available_recipes, command_line, load_recipe
from tests.helpers import tiny_flags


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_command_line_parses_back_to_its_run_config(name):
    recipe = load_recipe(name)
    strategy, seed, overrides = recipe.runs(seeds=[3])[0]
    overrides = {**overrides, "device": "cpu"}
    arguments = command_line(recipe, strategy, overrides)
    args = build_parser().parse_args(arguments)
    from_flags = resolve_config(args.benchmark, args.strategy,
                                {**overrides_from(args), "seed": args.seed})
    assert from_flags == resolve_config(recipe.spec.benchmark, strategy, overrides)
    assert from_flags.seed == 3


def test_recipes_ship_the_strategies_and_seeds_of_their_tables():
    assert set(available_recipes("tables")) == {"cifar100-10", "cifar100-20-fusion",
                                                "glue-class", "glue-task", "pacs-dil",
                                                "sentiment-dil"}
    for name in available_recipes("tables"):
        spec = load_recipe(name).spec
        compared = {"sulora", "sulora-nofusion"} if "fusion" in name else {
            "sulora", "sdlora", "inflora", "olora", "seqlora", "jointlora"}
        assert compared <= set(spec.strategies), name
        assert len(spec.seeds) >= 3 and spec.records, name


TINY_RECIPE = """\
title: bbc-news (tiny)
benchmark: bbc-news
seeds: [0]
common:
  backbone: {name: minilm-l6, max_length: 16}
  data: {limit_per_class: 4}
  training: {epochs: 1, batch_size: 8}
strategies:
  seqlora: {}
  sulora: {method: {alpha: 4.0}}
"""


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    monkeypatch.setattr(recipes, "RECIPES", folder)
    return tmp_path / "out"


def test_reproduce_dry_run_prints_every_run_and_runs_nothing(tiny_recipe, capsys):
    assert cli.main(["reproduce", "tiny", "--dry-run", "--device", "cpu", "--seeds", "0,1",
                     "--out", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out
    assert "tiny: bbc-news (tiny) (4 runs; 0 already done)" in out
    assert out.count("[todo] cl-sulora run --no-report --benchmark bbc-news") == 4
    assert "--strategy sulora --seed 1" in out and "method.alpha=4.0" in out
    assert not tiny_recipe.exists()


def test_reproduce_refuses_bad_choices_before_running(tiny_recipe, capsys):
    assert cli.main(["reproduce", "tiny", "--strategies", "sdlora", "--out",
                     str(tiny_recipe)]) == 2
    assert "has no strategy ['sdlora']" in capsys.readouterr().err
    assert cli.main(["reproduce", "tiny", "--set", "training.lr=-1", "--out",
                     str(tiny_recipe)]) == 2
    assert "training.lr" in capsys.readouterr().err
    assert not tiny_recipe.exists()


def test_reproduce_runs_the_table_reports_failures_and_skips_done_runs(tiny_recipe, capsys):
    tiny_recipe.mkdir()
    # another run's record where sulora's goes: that run refuses it (exit 1 names it)
    foreign = tiny_recipe / "bbc-news__sulora__seed0.json"
    foreign.write_text(json.dumps({"config": {"seed": 0, "training": {"lr": 1.0}}}))
    argv = ["reproduce", "tiny", "--device", "cpu", "--parallel", "2", "--out", str(tiny_recipe)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "bbc-news__seqlora__seed0: ok" in captured.out
    assert "bbc-news__sulora__seed0: FAILED (exit 2)" in captured.out
    assert "1 run(s) failed: bbc-news__sulora__seed0" in captured.err
    log = (tiny_recipe / "logs" / "bbc-news__sulora__seed0.log").read_text()
    assert "--overwrite" in log
    record = json.loads((tiny_recipe / "bbc-news__seqlora__seed0.json").read_text())
    assert record["command"][:3] == ["cl-sulora", "run", "--no-report"]
    table = (tiny_recipe / "bbc-news__compare.md").read_text()
    assert "| seqlora |" in table and "| sulora |" not in table
    assert not (tiny_recipe / "bbc-news__seqlora__seed0__compare.md").exists()

    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(2 runs; 1 already done)" in out
    assert "[done] cl-sulora run --no-report --benchmark bbc-news --strategy seqlora" in out
    assert "[todo] cl-sulora run --no-report --benchmark bbc-news --strategy sulora" in out


def test_reproduce_continues_overwrites_when_asked_and_keeps_the_whole_table(
        tiny_recipe, capsys, monkeypatch):
    tiny_recipe.mkdir()
    foreign = tiny_recipe / "bbc-news__sulora__seed0.json"
    foreign.write_text(json.dumps({"config": {"seed": 0, "training": {"lr": 1.0}}}))
    argv = ["reproduce", "tiny", "--device", "cpu", "--out", str(tiny_recipe), "--overwrite"]
    assert cli.main(argv) == 0  # --overwrite reaches the run that meets another record
    assert json.loads(foreign.read_text())["strategy"] == "sulora"
    # continued with --out spelt otherwise (relative)
    monkeypatch.chdir(tiny_recipe.parent)
    again = ["reproduce", "tiny", "--device", "cpu", "--out", tiny_recipe.name]
    capsys.readouterr()
    assert cli.main([*again, "--dry-run"]) == 0
    assert "(2 runs; 2 already done)" in capsys.readouterr().out
    # a subset run again: the folder's table still has every strategy's row
    assert cli.main([*again, "--strategies", "seqlora"]) == 0
    assert "0 runs to go" in capsys.readouterr().out
    table = (tiny_recipe / "bbc-news__compare.md").read_text()
    assert "| seqlora |" in table and "| sulora |" in table


def test_a_record_is_its_planned_runs_however_its_paths_were_spelt(tmp_path):
    config = {"seed": 0, "out": "/abs/out", "data": {"data_root": "/data", "seed": 0}}
    path = tmp_path / "record.json"
    run = reproduce.PlannedRun("sulora", 0, [], path, config)
    path.write_text(json.dumps({"config": {**config, "out": "out",
                                           "data": {"data_root": None, "seed": 0}}}))
    assert run.done
    path.write_text(json.dumps({"config": {**config, "data": {"data_root": "/data", "seed": 1}}}))
    assert not run.done


def test_empty_name_lists_are_refused_by_the_parser(capsys):
    for argv in (["reproduce", "cifar100-10", "--strategies", ","],
                 ["compare", "--benchmark", "bbc-news", "--strategies", "sulora", "--seeds", ""]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
        assert "names nothing" in capsys.readouterr().err


def test_eval_scores_a_checkpoint_as_the_run_did_without_training(tiny, tmp_path, capsys):
    flags = tiny_flags(tmp_path)
    assert cli.main(flags) == 0
    record = json.loads((tmp_path / "results" / "tiny-images__sulora__seed0.json").read_text())
    capsys.readouterr()
    out = tmp_path / "evaluated"
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]
    assert cli.main(argv) == 0
    assert "accuracy on the 3 trained experiences" in capsys.readouterr().out
    evaluated = json.loads((out / "tiny-images__sulora__seed0__eval-exp3.json").read_text())
    assert evaluated["accuracy"] == record["accuracy_matrix"][-1]
    assert evaluated["experiences_trained"] == 3
    assert evaluated["command"][:2] == ["cl-sulora", "eval"]
    assert {"commit", "versions", "device", "config"} <= set(evaluated)
    assert not torch.are_deterministic_algorithms_enabled()  # the run's setting, restored

    # an earlier checkpoint is scored on the whole stream, its mean over what it had trained
    earlier = sorted((tmp_path / "ckpt").glob("exp-*"))[0]
    assert cli.main(["eval", "--checkpoint", str(earlier), "--out", str(out)]) == 0
    evaluated = json.loads(next(out.glob("*eval-exp2.json")).read_text())
    assert evaluated["accuracy"] == record["accuracy_matrix"][1]
    assert evaluated["accuracy_on_trained"] == pytest.approx(
        sum(record["accuracy_matrix"][1][:2]) / 2)

    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    # the accepted overrides are validated as a run's are: a clear error, no traceback
    assert cli.main([*argv, "--set", "training.eval_batch_size=0"]) == 2
    assert "training.eval_batch_size" in capsys.readouterr().err
    # and the record says how the evaluation differed from the run
    assert cli.main([*argv, "--set", "training.eval_batch_size=5", "training.num_workers=0"]) == 0
    evaluated = json.loads((out / "tiny-images__sulora__seed0__eval-exp3.json").read_text())
    assert evaluated["accuracy"] == record["accuracy_matrix"][-1]
    changes = evaluated["config_changes"]
    assert [change.split(":")[0] for change in changes] == ["out", "training.eval_batch_size"]
    assert changes[1] == "training.eval_batch_size: 128 -> 5"


@pytest.mark.parametrize("key", ["method.rank=8", "data.num_experiences=1", "training.epochs=7",
                                 "training.lr=-1", "backbone.pooling=cls", "seed=3",
                                 "benchmark=other", "compile=true"])
def test_eval_refuses_overrides_that_change_what_was_trained_or_evaluated(
        key, tmp_path, monkeypatch, capsys):
    def built(*args, **kwargs):
        raise AssertionError("the evaluation was built")

    monkeypatch.setattr(loop, "build_experiment", built)
    monkeypatch.setattr(loop, "load_checkpoint", built)
    monkeypatch.setattr(loop, "latest_checkpoint", built)
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--set", key]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"eval --set {key.split('=')[0]}:" in err
    assert ", ".join(loop.EVAL_MAY_CHANGE) in err
    # the keys that may change pass the check (the missing checkpoint stops it after)
    monkeypatch.undo()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data-root", "d",
                     "--device", "cpu", "--precision", "fp32", "--out", "o", "--set",
                     "training.eval_batch_size=8", "training.num_workers=1"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def test_single_run_writes_its_table_and_plots(tiny, tmp_path, capsys):
    assert cli.main(["run", "--strategy", "seqlora", *tiny, "--num-experiences", "2"]) == 0
    out = tmp_path / "results"
    stem = "tiny-images__seqlora__seed0"
    table = (out / f"{stem}__compare.md").read_text()
    assert "| seqlora |" in table
    assert (out / f"{stem}__matrices.png").read_bytes()[:4] == b"\x89PNG"
    assert "| seqlora |" in capsys.readouterr().out


def test_loggers_write_csv_and_tensorboard_per_run(tiny, tmp_path):
    argv = ["run", "--strategy", "seqlora", *tiny, "--num-experiences", "2", "--no-report",
            "--loggers", "csv,tensorboard"]
    assert cli.main(argv) == 0
    logs = tmp_path / "results" / "logs" / "tiny-images__seqlora__seed0"
    csv = (logs / "csv" / "eval_results.csv").read_text()
    assert "eval_exp" in csv.splitlines()[0] and len(csv.splitlines()) > 2
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "results").glob("*__compare.md"))


def test_bad_loggers_are_refused_before_training(tiny, tmp_path, monkeypatch, capsys):
    argv = ["run", "--strategy", "seqlora", *tiny]
    assert cli.main([*argv, "--loggers", "csv,neptune"]) == 2
    assert "unknown logger(s) ['neptune']" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    assert cli.main([*argv, "--loggers", "wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def fake_wandb(*, chart_home: str | None = "plot") -> types.ModuleType:
    """A wandb module as recent releases are: no ``util.generate_id``, no ``wandb.viz``
    (``chart_home``: where ``CustomChart`` lives, if anywhere); it records its calls."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.__version__ = "9.9"
    module.calls = []
    module.run = None

    def init(**kwargs):
        module.calls.append(("init", kwargs))
        module.run = types.SimpleNamespace(_label=lambda **kwargs: None)

    def finish():
        module.calls.append(("finish",))
        module.run = None

    module.init, module.finish = init, finish
    module.log = lambda values, step: module.calls.append(("log", values, step))
    module.util = types.SimpleNamespace()
    module.Image = module.Histogram = object
    if chart_home:
        setattr(module, chart_home, types.SimpleNamespace(CustomChart=type("CustomChart", (), {})))
    return module


def test_wandb_without_the_names_avalanche_reads_is_refused_before_training(
        tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(chart_home=None))
    assert cli.main(["run", "--strategy", "seqlora", *tiny, "--loggers", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "wandb.plot.CustomChart (or wandb.viz.CustomChart), which wandb 9.9 lacks" in err
    assert "Traceback" not in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("chart_home", ["plot", "viz"])  # wandb >= 0.17.9, and before
def test_avalanches_wandb_logger_runs_on_a_wandb_without_generate_id(chart_home, tmp_path,
                                                                     monkeypatch):
    wandb = fake_wandb(chart_home=chart_home)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (logger,) = loggers.make_loggers(["wandb"], tmp_path, "first", {"seed": 0})
    logger.log_single_metric("Top1_Acc_Stream", 0.5, 3)  # reads wandb.viz.CustomChart
    (_, init), log = wandb.calls
    assert len(init["id"]) == 8 and init["name"] == "first" and init["config"] == {"seed": 0}
    assert log == ("log", {"Top1_Acc_Stream": 0.5}, 3)
    # the next run of the process (compare) gets a W&B run of its own
    loggers.make_loggers(["wandb"], tmp_path, "second", {"seed": 1})
    assert [call[0] for call in wandb.calls[2:]] == ["finish", "init"]
    assert wandb.calls[-1][1]["id"] != init["id"]


def test_compare_logs_each_run_to_a_wandb_run_of_its_own(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    argv = ["compare", "--strategies", "seqlora,sulora", *tiny, "--num-experiences", "2",
            "--loggers", "wandb"]
    try:
        assert cli.main(argv) == 0
    finally:
        wandb.finish()
    logs = tmp_path / "results" / "logs"
    ids = set()
    for strategy in ("seqlora", "sulora"):
        (run,) = (logs / f"tiny-images__{strategy}__seed0" / "wandb").rglob("run-*.wandb")
        assert b"Top1_Acc_Stream/eval_phase/test_stream" in run.read_bytes()
        ids.add(run.name)
    assert len(ids) == 2


#: Starts the command line as on a machine with no QP solver installed, where qpsolvers (which
#: Avalanche imports) warns at import time: its solver modules are made unimportable.
WITHOUT_QP_SOLVERS = """
import pathlib, sys
import qpsolvers.solvers as _probe
folder = pathlib.Path(_probe.__file__).parent
for name in list(sys.modules):
    if name.startswith("qpsolvers"):
        del sys.modules[name]
for module in folder.glob("*_.py"):
    sys.modules["qpsolvers.solvers." + module.stem] = None
from cl_sulora.runner.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["run", "--help"], ["list"], ["reproduce", "--help"]])
def test_help_and_list_print_no_third_party_warnings(argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # a user's default
    done = subprocess.run([sys.executable, "-c", WITHOUT_QP_SOLVERS, *argv],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not list(tmp_path.iterdir())  # nothing written


def test_reproduce_refuses_a_table_without_the_data_and_weights_it_needs(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.delenv("CL_SULORA_DATA", raising=False)
    argv = ["reproduce", "pacs-dil", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "needs --data-root and --backbone-weights" in capsys.readouterr().err
    assert cli.main([*argv, "--data-root", str(tmp_path)]) == 2
    assert "needs --backbone-weights" in capsys.readouterr().err
    assert cli.main([*argv, "--dry-run"]) == 0  # listing needs neither
    assert not (tmp_path / "out").exists()


def test_a_paper_recipes_report_puts_the_measured_beside_the_published():
    recipe = load_recipe("paper/imagenet-r-10")
    matrix = [[0.5, 0.0], [0.4, 0.8]]
    records = [{"strategy": "sdlora", "accuracy_matrix": matrix, "notes": {"test_sizes": [1, 3]}},
               {"strategy": "sdlora", "accuracy_matrix": [[1.0, 0.0], [1.0, 1.0]],
                "notes": {"test_sizes": [1, 3]}}]
    lines = reproduce.published_table(recipe, records).splitlines()
    sdlora = next(line for line in lines if line.startswith("| sdlora |"))
    # final: (0.4 + 2.4) / 4 = 70% and 100%; average: (50 + 70) / 2 = 60% and 100%
    assert sdlora.startswith("| sdlora | 2 | 85.00 ± 21.21 | 77.34 | 80.00 ± 28.28 | 82.04 |")
    assert any(line.startswith("| inflora | 0 | not run | 74.75 |") for line in lines)
    assert f"- {recipe.spec.deviations[0]}" in lines
