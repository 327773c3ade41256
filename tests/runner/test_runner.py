"""The experiment runner: metrics, presets and overrides, the stream loop, results and reports."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl_sulora import metrics
from cl_sulora.errors import ConfigError
from cl_sulora.methods.registry import METHODS
from cl_sulora.runner import cli
from cl_sulora.runner.build import build_experiment
from cl_sulora.runner.config import parse_overrides, resolve_config, result_path
from cl_sulora.runner.loop import run
from cl_sulora.runner.presets import PRESETS, available_presets, load_preset
from cl_sulora.runner.report import markdown_table, write_report
from cl_sulora.training.plugins import TF32, Autocast, LatestValue, LRSchedule
from tests.helpers import TINY_VIT, tiny_config

ALL_PRESETS = [
    "sulora",
    "sulora-nofusion",
    "sdlora",
    "sdlora-rr",
    "sdlora-kd",
    "inflora",
    "olora",
    "seqlora",
    "inclora",
    "jointlora",
    "naive",
    "ewc",
    "lwf",
    "replay",
]


# ------------------------------------------------------------------------------------- metrics
def test_metrics_on_a_hand_made_matrix():
    r = [[0.9, 0.1, 0.0], [0.8, 0.7, 0.2], [0.6, 0.5, 0.9]]
    assert metrics.a_last(r) == pytest.approx(2.0 / 3)
    assert metrics.accuracy_curve(r) == pytest.approx([0.9, 0.75, 2.0 / 3])
    assert metrics.a_avg(r) == pytest.approx((0.9 + 0.75 + 2.0 / 3) / 3)
    assert metrics.forgetting(r) == pytest.approx((0.3 + 0.2) / 2)
    assert metrics.bwt(r) == pytest.approx((-0.3 - 0.2) / 2)


def test_the_papers_accuracy_weighs_each_seen_test_sample_alike():
    """SD-LoRA's and InfLoRA's "Acc": correct predictions over all seen test samples, so an
    experience with 3 times the test images counts 3 times."""
    r = [[0.5, 0.0, 0.0], [0.4, 0.8, 0.0], [0.2, 0.6, 1.0]]
    curve = metrics.sample_weighted_curve(r, [1, 3, 1])
    assert curve == pytest.approx([0.5, (0.4 + 3 * 0.8) / 4, (0.2 + 3 * 0.6 + 1.0) / 5])
    assert metrics.sample_weighted_curve(r, [2, 2, 2]) == pytest.approx(metrics.accuracy_curve(r))
    with pytest.raises(ValueError, match="3 positive test set sizes"):
        metrics.sample_weighted_curve(r, [1, 3])


def test_forgetting_uses_the_best_earlier_accuracy():
    r = [[0.5, 0.0, 0.0], [0.8, 0.6, 0.0], [0.4, 0.6, 0.7]]
    assert metrics.forgetting(r) == pytest.approx((0.4 + 0.0) / 2)  # max(0.5, 0.8) - 0.4
    assert metrics.bwt(r) == pytest.approx((-0.1 + 0.0) / 2)  # against R[j][j] only


def test_forgetting_over_all_earlier_rows_counts_rows_before_training_too():
    """Domain-incremental: experience 1 is half solved before it trains (row 0)."""
    r = [[0.9, 0.7, 0.5], [0.8, 0.6, 0.5], [0.7, 0.4, 0.8]]
    assert metrics.forgetting(r) == pytest.approx(((0.9 - 0.7) + (0.6 - 0.4)) / 2)
    assert metrics.forgetting_all_rows(r) == pytest.approx(((0.9 - 0.7) + (0.7 - 0.4)) / 2)


def test_metrics_edge_cases():
    assert metrics.summarize([[0.7]]) == {
        "A_last": 0.7,
        "A_avg": 0.7,
        "forgetting": None,
        "forgetting_all_rows": None,
        "bwt": None,
    }
    joint = metrics.summarize([[0.8, 0.6]])
    assert joint == {"A_last": pytest.approx(0.7), "A_avg": None, "forgetting": None,
                     "forgetting_all_rows": None, "bwt": None}
    with pytest.raises(ValueError, match="square"):
        metrics.a_last([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])


# ------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_validates(name):
    path = PRESETS / f"{name}.yaml"
    assert path.is_file() and name in METHODS
    preset = load_preset(name)
    assert preset.spec.name == name and str(preset.path) == str(path)
    assert preset.training.lr > 0


def test_preset_unknown_key_names_file_and_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: sulora\nmethod: {rnak: 8}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*method\.rnak.*valid method keys"):
        load_preset(str(path))
    path.write_text("strategy: sulora\ntraining: {learning_rate: 0.1}\n")
    with pytest.raises(
        ConfigError,
        match=r"(?s)mine\.yaml.*training\.learning_rate: unknown "
        r"key; valid keys: \[.*'lr'",
    ):
        load_preset(str(path))


def test_preset_wrong_type_names_file_and_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: sulora\ntraining: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"(?s)mine\.yaml.*fix the file.*training\.lr.*'fast'"):
        load_preset(str(path))
    path.write_text("strategy: sulora\nmethod: {rank: 0}\n")
    with pytest.raises(ConfigError, match=r"(?s)mine\.yaml.*rank must be >= 1"):
        load_preset(str(path))


def test_unknown_strategy_and_benchmark_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'.*sulora"):
        load_preset("nope")
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: nope\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: strategy 'nope' is not a registered"):
        load_preset(str(path))
    with pytest.raises(ConfigError, match=r"unknown benchmark 'nope'.*bbc-news"):
        resolve_config("nope", "sulora")


def test_available_presets_cover_the_registry():
    assert set(METHODS) <= set(available_presets())


# ----------------------------------------------------------------------------------- overrides
def test_parse_overrides_yaml_types():
    parsed = parse_overrides(
        [
            "training.lr=1e-3",
            "method.qkv_parts=[q, k, v]",
            "data.augment=false",
            "backbone.kwargs={img_size: 8}",
            "method.target_modules=null",
            "seed=3",
            "out=a=b",
        ]
    )
    assert parsed == {
        "training.lr": 1e-3,
        "method.qkv_parts": ["q", "k", "v"],
        "data.augment": False,
        "backbone.kwargs": {"img_size": 8},
        "method.target_modules": None,
        "seed": 3,
        "out": "a=b",
    }
    for bad in ("training.lr", "=3", "a..b=1", "x=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_overrides([bad])


def test_flags_override_preset_and_set_overrides_flags(tiny):
    args = cli.build_parser().parse_args(
        [
            "run",
            "--strategy",
            "sulora",
            *tiny,
            "--lr",
            "0.5",
            "--set",
            "training.lr=0.25",
            "--set",
            "method.rank=2",
            "--limit-per-class",
            "3",
        ]
    )
    assert cli.build_parser().parse_args(["run", "--set", "a=1", "b=2", "--set", "c=3"]).sets == [
        "a=1",
        "b=2",
        "c=3",
    ]
    overrides = cli.overrides_from(args, {"training.epochs": 7, "training.batch_size": 4})
    assert overrides["training.lr"] == 0.25 and overrides["training.epochs"] == 1
    assert overrides["training.batch_size"] == 8
    with pytest.raises(ConfigError, match="no option 'limit_per_class'"):
        resolve_config("tiny-images", "sulora", overrides)
    del overrides["data.limit_per_class"]
    config = resolve_config("tiny-images", "sulora", overrides)
    preset = load_preset("sulora")
    assert config.training.lr == 0.25 and config.method["rank"] == 2
    assert config.training.optimizer == preset.training.optimizer
    assert config.method["num_slots"] == preset.method["num_slots"]
    assert config.method["seed"] == config.seed == 0


def test_bad_overrides_are_clear(tiny):
    with pytest.raises(ConfigError, match=r"lr: unknown key; valid keys: \[.*'training'"):
        resolve_config("tiny-images", "sulora", {"lr": 1.0})
    with pytest.raises(ConfigError, match=r"training\.epochs.*'many'"):
        resolve_config("tiny-images", "sulora", {"training.epochs": "many"})
    with pytest.raises(ConfigError, match=r"method\.rnak"):
        resolve_config("tiny-images", "sulora", {"method.rnak": 2})
    with pytest.raises(ConfigError, match="fixed by the backbone"):
        resolve_config("tiny-images", "sulora", {"data.mean": [0.5]})
    with pytest.raises(ConfigError, match="cannot be overridden"):
        resolve_config("tiny-images", "sulora", {"strategy": "seqlora"})
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_config("tiny-images", "sulora", {"device": "gpu0"})


def test_result_names():
    config = resolve_config("split-glue", "sulora", {"data.protocol": "class-incremental"})
    assert result_path(config).name == "split-glue-class-incremental__sulora__seed0.json"
    config = resolve_config(
        "split-cifar100-10",
        "seqlora" if "seqlora" in METHODS else "sulora",
        {"seed": 2, "out": "x"},
    )
    assert result_path(config).parent == Path("x")
    assert result_path(config).name.startswith("split-cifar100-10__")
    assert result_path(config).name.endswith("__seed2.json")
    assert config.backbone.name == "vit_small_patch16_224"  # the image default
    assert resolve_config("bbc-news", "sulora").backbone.name == "minilm-l6"
    # each stream order of a text stream gets its own record
    args = cli.build_parser().parse_args(["run", "--order-seed", "2", "--protocol",
                                          "class-incremental"])
    config = resolve_config("long-text", "frozen", cli.overrides_from(args))
    assert result_path(config).name == "long-text-class-incremental-order2__frozen__seed0.json"
    config = resolve_config("long-text", "frozen", {"data.order_seed": None})
    assert result_path(config).name == "long-text-task-incremental__frozen__seed0.json"


def test_validation_option_names_results_and_is_checked():
    config = resolve_config("split-glue", "sulora", {"data.validation": 0.1})
    assert result_path(config).name == "split-glue-task-incremental-val0.1__sulora__seed0.json"
    args = cli.build_parser().parse_args(["run", "--validation", "0.2"])
    config = resolve_config("pacs-dil", "sulora", cli.overrides_from(args))
    assert config.data["validation"] == 0.2
    assert result_path(config).name == "pacs-dil-val0.2__sulora__seed0.json"
    overrides = parse_overrides(["data.validation=0.15"])
    assert resolve_config("split-cifar100-10", "sulora", overrides).data["validation"] == 0.15
    assert "val" not in result_path(resolve_config("pacs-dil", "sulora")).name
    for bad in (1.0, -0.5):
        with pytest.raises(ConfigError, match="data.validation: validation must be a fraction"):
            resolve_config("bbc-news", "sulora", {"data.validation": bad})
    with pytest.raises(ConfigError, match="data.validation: Input should be a valid number"):
        resolve_config("bbc-news", "sulora", {"data.validation": "10%"})


def test_demo_settings_resolve():
    for strategy in cli.DEMO["strategies"]:
        if load_preset(strategy).spec.name not in METHODS:
            pytest.skip(f"{strategy} not registered")
        config = resolve_config(cli.DEMO["benchmark"], strategy, cli.DEMO["overrides"])
        assert config.backbone.name == "minilm-l6" and config.benchmark == "bbc-news"


# -------------------------------------------------------------------------------------- plugins
def test_cosine_schedule_follows_rebuilt_optimizers():
    schedule = LRSchedule(0.1, "cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    strategy = SimpleNamespace(
        train_epochs=2, dataloader=[0, 1], optimizer=torch.optim.SGD([param], lr=0.1),
        experience=SimpleNamespace(current_experience=0),
    )
    schedule.before_training_exp(strategy)
    seen = []
    for _ in range(4):
        schedule.before_training_iteration(strategy)
        seen.append(strategy.optimizer.param_groups[0]["lr"])
        strategy.optimizer = torch.optim.SGD([param], lr=0.1)  # rebuilt by a strategy
    assert seen == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2])
    assert LRSchedule(0.1, "constant").lr_at(3) == 0.1


def test_latest_value_reads_host_scalars_at_once():
    latest = LatestValue()
    assert latest.push(torch.tensor([2.5, 7.0])) == 2.5
    assert latest.push(torch.tensor(1.25, requires_grad=True) * 2) == 2.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latest_value_of_device_scalars_arrives_without_waiting():
    latest = LatestValue()
    seen = [latest.push(torch.tensor(float(i), device="cuda")) for i in range(3)]
    torch.cuda.synchronize()
    seen.append(latest.push(torch.tensor(3.0, device="cuda")))
    assert seen[0] is None and [v for v in seen if v is not None][-1] in (0.0, 1.0, 2.0)


def test_autocast_wraps_forward_and_returns_float_logits():
    plugin = Autocast("cpu")
    strategy = SimpleNamespace(mb_output=None)
    plugin.before_forward(strategy)
    assert torch.is_autocast_enabled("cpu")
    strategy.mb_output = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    assert strategy.mb_output.dtype == torch.bfloat16
    plugin.after_forward(strategy)
    assert not torch.is_autocast_enabled("cpu") and strategy.mb_output.dtype == torch.float32


def test_tf32_switches_the_backends_on_for_train_and_eval_and_puts_them_back():
    backends = torch.backends
    before = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
    try:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = False, False
        plugin, strategy = TF32(), SimpleNamespace()
        plugin.before_training(strategy)
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
        plugin.before_eval(strategy)  # an evaluation inside training
        plugin.after_eval(strategy)
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
        plugin.after_training(strategy)
        assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


def test_tf32_on_a_cpu_is_refused_before_anything_is_built(tiny, tmp_path, monkeypatch):
    import cl_sulora.runner.build as build

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the precision was checked")

    monkeypatch.setattr(build, "build_backbone", no_backbone)
    with pytest.raises(ConfigError, match="precision tf32 .* use --precision fp32"):
        build_experiment(tiny_config(tmp_path, precision="tf32"))


# --------------------------------------------------------------------------------- stream runs
def test_matrix_metrics_agree_with_avalanche(tiny, tmp_path):
    result = run(tiny_config(tmp_path))
    r = result.stream.accuracy_matrix
    t = len(r)
    assert t == 3 and all(len(row) == t for row in r)
    last = result.stream.last_metrics
    for j in range(t - 1):
        exp = f"eval_phase/test_stream/Task000/Exp{j:03d}"
        assert last[f"ExperienceBWT/{exp}"] == pytest.approx(r[t - 1][j] - r[j][j])
        assert last[f"ExperienceForgetting/{exp}"] == pytest.approx(r[j][j] - r[t - 1][j])
    # Avalanche averages over the experiences before the last one, as we do.
    assert last["StreamBWT/eval_phase/test_stream"] == pytest.approx(metrics.bwt(r))
    avalanche_forgetting = last["StreamForgetting/eval_phase/test_stream"]
    assert avalanche_forgetting == pytest.approx(-metrics.bwt(r))
    # Ours takes the best earlier accuracy, Avalanche's the one right after training: ours is
    # never below (and equal with two experiences, see the deterministic test).
    assert metrics.forgetting(r) >= avalanche_forgetting - 1e-12
    assert result.record["A_avg"] == pytest.approx(metrics.a_avg(r))


def test_cli_run_end_to_end_writes_a_consistent_record(tiny, tmp_path, capsys):
    assert cli.main(["run", "--strategy", "sulora", *tiny, "--seed", "1"]) == 0
    path = tmp_path / "results" / "tiny-images__sulora__seed1.json"
    assert str(path) in capsys.readouterr().out
    record = json.loads(path.read_text())
    expected = {
        "benchmark",
        "protocol",
        "strategy",
        "seed",
        "backbone",
        "commit",
        "device",
        "command",
        "config",
        "experience_names",
        "accuracy_matrix",
        "A_last",
        "A_avg",
        "forgetting",
        "forgetting_all_rows",
        "bwt",
        "trainable_params",
        "live_adapter_params",
        "stored_state_params",
        "train_seconds",
        "peak_memory_mb",
        "notes",
    }
    assert expected <= set(record)
    assert record["benchmark"] == "tiny-images" and record["strategy"] == "sulora"
    assert record["protocol"] == "class-incremental" and record["seed"] == 1
    assert record["command"][:2] == ["cl-sulora", "run"]
    assert record["config"]["seed"] == 1 and record["config"]["method"]["seed"] == 1
    assert record["config"]["training"]["epochs"] == 1
    assert record["config"]["backbone"]["kwargs"] == TINY_VIT
    r = record["accuracy_matrix"]
    assert len(r) == 3 and all(len(row) == 3 for row in r)
    assert all(0.0 <= a <= 1.0 for row in r for a in row)
    for key, value in metrics.summarize(r).items():
        assert record[key] == pytest.approx(value)
    assert record["trainable_params"] > 0 and record["train_seconds"] > 0
    assert record["peak_memory_mb"] > 0
    assert record["live_adapter_params"] is None or record["live_adapter_params"] > 0
    assert record["notes"] == {"generated": True, "path": "/nowhere"}
    assert record["commit"] is None or set(record["commit"]) == {"sha", "dirty"}


def test_cli_errors_are_reported_not_raised(tiny, capsys):
    assert cli.main(["run", "--strategy", "nope", *tiny]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert cli.main(["run", "--strategy", "sulora"]) == 2
    assert "both --benchmark and --strategy" in capsys.readouterr().err
    assert cli.main(["run", "--strategy", "sulora", *tiny, "--set", "lr"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_compare_writes_table_and_plots(tiny, tmp_path, capsys):
    argv = [
        "compare",
        "--strategies",
        "sulora,seqlora",
        "--seeds",
        "0,1",
        *tiny,
        "--num-experiences",
        "2",
    ]
    assert cli.main(argv) == 0
    out = tmp_path / "results"
    names = {p.name for p in out.iterdir()}
    assert {
        f"tiny-images__{s}__seed{k}.json" for s in ("sulora", "seqlora") for k in (0, 1)
    } <= names
    assert {
        "tiny-images__compare.md",
        "tiny-images__matrices.png",
        "tiny-images__curves.png",
    } <= names
    for png in ("tiny-images__matrices.png", "tiny-images__curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "tiny-images__compare.md").read_text()
    assert "| sulora |" in table and "| seqlora |" in table and " ± " in table
    assert "A_last (%)" in table and "Live adapter params" in table
    assert "| sulora |" in capsys.readouterr().out


def test_a_second_compare_into_a_folder_adds_to_its_table(tiny, tmp_path, capsys):
    base = ["compare", *tiny, "--num-experiences", "2"]
    assert cli.main([*base, "--strategies", "sulora,seqlora"]) == 0
    assert cli.main([*base, "--strategies", "frozen"]) == 0
    table = (tmp_path / "results" / "tiny-images__compare.md").read_text()
    assert all(f"| {s} |" in table for s in ("sulora", "seqlora", "frozen"))
    assert "not in this table" not in table
    # under other settings the earlier runs are named, not mixed in
    assert cli.main([*base, "--strategies", "frozen", "--epochs", "2", "--overwrite"]) == 0
    table = (tmp_path / "results" / "tiny-images__compare.md").read_text()
    assert "| frozen |" in table and "| sulora |" not in table
    assert ("not in this table: 2 other record(s)" in table
            and "tiny-images__seqlora__seed0.json" in table)


def test_report_handles_joint_and_missing_values(tmp_path):
    base = {
        "benchmark": "b",
        "protocol": "class-incremental",
        "backbone": "x",
        "device": "cpu",
        "config": {"training": {"lr": 0.1}},
        "live_adapter_params": None,
        "train_seconds": 1.0,
    }
    records = [
        {
            **base,
            "strategy": "seq",
            "seed": 0,
            "accuracy_matrix": [[0.9, 0.0], [0.5, 0.8]],
            **metrics.summarize([[0.9, 0.0], [0.5, 0.8]]),
        },
        {
            **base,
            "strategy": "joint",
            "seed": 0,
            "accuracy_matrix": [[0.9, 0.7]],
            **metrics.summarize([[0.9, 0.7]]),
        },
    ]
    table = markdown_table(records)
    assert "| seq | 65.0 | 77.5 | 40.0 | 40.0 | -40.0 | n/a | n/a | 1.0 | 0 |" in table
    assert "| joint | 80.0 | n/a | n/a | n/a | n/a |" in table
    paths = write_report(records, tmp_path, "b")
    assert all(p.is_file() for p in paths.values())


def test_deterministic_cpu_runs_are_bit_identical(tiny, tmp_path):
    config = tiny_config(tmp_path, deterministic=True, **{"data.num_experiences": 2})
    first, second = run(config), run(config)
    assert first.record["accuracy_matrix"] == second.record["accuracy_matrix"]
    avalanche = first.stream.last_metrics["StreamForgetting/eval_phase/test_stream"]
    assert first.record["forgetting"] == pytest.approx(avalanche)  # T = 2: same definition
    a, b = first.experiment.model.state_dict(), second.experiment.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_task_incremental_uses_multi_head_and_task_aware_inference(tiny, tmp_path):
    config = tiny_config(tmp_path, **{"data.task_incremental": True})
    experiment = build_experiment(config)
    assert experiment.spec.protocol == "task-incremental"
    assert type(experiment.model.head).__name__ == "MultiHeadClassifier"
    assert experiment.strategy.sulora.inference == "task-aware"
    assert build_experiment(tiny_config(tmp_path)).strategy.sulora.inference == "agnostic"


def test_overrides_from_namespace_without_flags():
    args = argparse.Namespace(sets=["training.lr=0.5"])
    assert cli.overrides_from(args, {"training.lr": 0.1}) == {"training.lr": 0.5}


# ----------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not os.environ.get("CL_SULORA_DATA"), reason="set CL_SULORA_DATA")
def test_real_cifar_run(tmp_path):
    config = resolve_config(
        "split-cifar100-10",
        "sulora",
        {
            "backbone.kwargs": TINY_VIT | {"img_size": 32},
            "data.limit_per_class": 2,
            "data.num_experiences": 2,
            "training.epochs": 1,
            "device": "cpu",
            "out": str(tmp_path),
        },
    )
    record = run(config).record
    assert len(record["accuracy_matrix"]) == 2 and record["notes"]["class_order"]


def test_commit_named_by_the_environment_wins(monkeypatch, tmp_path):
    import subprocess

    from cl_sulora.runner.records import git_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    monkeypatch.setenv("CL_SULORA_COMMIT", "abc123")
    assert git_commit(tmp_path) == {"sha": "abc123", "dirty": None}
    monkeypatch.delenv("CL_SULORA_COMMIT")
    assert git_commit(tmp_path) == {"sha": sha, "dirty": False}
    (tmp_path / "f").write_text("y")
    assert git_commit(tmp_path) == {"sha": sha, "dirty": True}
    assert git_commit(tmp_path / "nothing") is None


def test_closed_form_methods_run_and_refuse_what_would_break_them(tiny, tmp_path):
    result = run(tiny_config(tmp_path, "ranpac", **{"method.projection_dim": 32}))
    record = result.record
    assert record["trainable_params"] == 0 and len(record["accuracy_matrix"]) == 3
    assert record["stored_state_params"] == 32 * 32 + 32 * 6 + 48 * 32
    with pytest.raises(ConfigError, match="classifier alignment.*alignment.enabled=false"):
        tiny_config(tmp_path, "simplecil", **{"alignment.enabled": True})  # before building
    til = run(tiny_config(tmp_path / "til", "simplecil", **{"data.task_incremental": True}))
    assert sorted(til.experiment.model.head.heads) == ["0", "1", "2"]  # a head per task
    assert min(til.record["accuracy_matrix"][-1]) > 0.5  # each task's two classes, told apart


def test_a_record_names_the_commit_its_run_was_built_from(tiny, tmp_path, monkeypatch):
    """The checkout may move on during a long run: the record keeps the commit of the code
    the run was built from, not the one found when it ends."""
    from avalanche.core import SupervisedPlugin

    class CheckoutMovesOn(SupervisedPlugin):
        def after_training_exp(self, strategy, **kwargs):
            monkeypatch.setenv("CL_SULORA_COMMIT", "after")

    monkeypatch.setenv("CL_SULORA_COMMIT", "before")
    config = tiny_config(tmp_path, **{"data.num_experiences": 1})
    result = run(config, plugins=[CheckoutMovesOn()])
    assert result.record["commit"] == {"sha": "before", "dirty": None}
    assert json.loads(result_path(config).read_text())["commit"]["sha"] == "before"
