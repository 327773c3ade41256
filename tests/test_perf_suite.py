"""The performance suite in tiny CPU mode: every group file and ``summary.json`` follow the
schema the report and the lead's tooling read, and the report renders from them."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.perf import report, suite
from benchmarks.perf.results import GROUPS, read_groups
from benchmarks.perf.summary import build_summary

BACKBONES = ("vit-s4", "vit-b16")
SUMMARY_KEYS = {
    "train_step_vs_peft_lora_exp10", "train_step_vs_sdlora_exp10",
    "merged_inference_vs_backbone", "unmerged_inference_vs_backbone_10_slots",
    "adapter_memory_100_vs_10_experiences", "boundary_time_fraction",
    "ddp_2gpu_speedup", "ddp_2gpu_a_last_delta",
}
DDP_KEYS = {"ddp_2gpu_speedup", "ddp_2gpu_a_last_delta"}
ENTRY_KEYS = {"value", "device", "commit", "target", "pass"}
METHODS = {"backbone", "peft_lora", "sulora", "sdlora", "inflora", "olora"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("perf")
    threads = torch.get_num_threads()  # tiny mode runs on one thread
    try:
        for backbone in BACKBONES:
            suite.main(["--out", str(out), "--tiny", "--backbones", backbone, "--iters", "2",
                        "--warmup", "0", "--commit", "abc123"])
    finally:
        torch.set_num_threads(threads)
    return out


def test_group_files(run_dir):
    groups = read_groups(run_dir)
    assert list(groups) == list(BACKBONES)
    for backbone, by_group in groups.items():
        assert set(by_group) == set(GROUPS)
        for payload in by_group.values():
            assert payload["backbone"] == backbone
            assert payload["device"].startswith("cpu") and payload["torch"] == torch.__version__
            assert isinstance(payload["commit"], str) and payload["commit"]
            assert payload["settings"]["suite"]["tiny"] is True
            assert set(payload["settings"]["methods"]) == METHODS - {"backbone"}
        train = by_group["train_step"]["results"]["records"]
        assert {r["method"] for r in train} == METHODS
        for record in train:
            assert len(record["times_ms"]) == 2 and record["median_ms"] > 0
            assert record["flops"] > 0 and record["trainable_params"] > 0
        checkpoints = {r["experience"] for r in train if r["method"] == "sulora"}
        assert checkpoints == {1, 10, 50, 100}
        modes = {(r["method"], r["mode"]) for r in by_group["inference"]["results"]["records"]}
        assert ("backbone", "bare") in modes and ("sulora", "merged") in modes
        memory = by_group["memory"]["results"]
        sdlora = [r["adapter_bytes"] for r in memory["curve"] if r["method"] == "sdlora"]
        assert len(sdlora) == 100 and sdlora[-1] > 5 * sdlora[9]  # one branch per experience
        boundary = by_group["boundary"]["results"]
        assert {r["allocator"] for r in boundary["records"]} == {"orthogonal", "principal",
                                                                  "data"}
        assert any(r["fused_pairs"] > 0 for r in boundary["records"])
        assert boundary["experience_train_ms"] > 0
        assert boundary["steps_per_experience"] == (boundary["epochs"]
                                                    * boundary["steps_per_epoch"])
        sweep = boundary["data_sample_sweep"]
        assert [r["data_max_samples"] for r in sweep] == [4, 16]
        assert all(r["median_total_ms"] > 0 for r in sweep)
        floor = by_group["floor"]["results"]
        assert floor["floor_ms"] > 0 and floor["matmul"]["tflops"] > 0
        assert by_group["profile"]["results"]["top_ops"]


def test_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    for key, entry in summary.items():
        assert ENTRY_KEYS <= set(entry)
        if key in DDP_KEYS:
            assert entry["value"] is None and entry["note"] == "measured by the DDP run"
            continue
        assert isinstance(entry["value"], float) and isinstance(entry["pass"], bool)
        assert entry["pass"] == (entry["value"] <= entry["target"])
        assert set(entry["by_backbone"]) == set(BACKBONES)
        assert entry["value"] == max(entry["by_backbone"].values())
    assert summary["adapter_memory_100_vs_10_experiences"]["value"] <= 1.0  # fusion


def test_ddp_entries_are_taken_from_the_ddp_run(run_dir, tmp_path):
    ddp = {"ddp_2gpu_speedup": {"value": 1.9, "device": "2x H100", "commit": "abc123",
                                "target": 1.8, "pass": True}}
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(ddp))
    summary = build_summary(run_dir, path)
    assert summary["ddp_2gpu_speedup"] == ddp["ddp_2gpu_speedup"]
    assert summary["ddp_2gpu_a_last_delta"]["value"] is None


def test_report(run_dir, tmp_path):
    output, published = tmp_path / "PERFORMANCE.md", tmp_path / "summary.json"
    (run_dir / "notes.md").write_text("A hand-written observation.")
    report.main([str(run_dir), "--output", str(output), "--plots", str(tmp_path / "plots"),
                 "--summary", str(published)])
    text = output.read_text()
    assert json.loads(published.read_text()) == json.loads((run_dir / "summary.json").read_text())
    assert "## Notes\n\nA hand-written observation." in text
    meta = read_groups(run_dir)["vit-s4"]["floor"]
    assert "Tiny CPU check run" in text
    assert meta["commit"] in text and meta["device"] in text
    for backbone in BACKBONES:
        assert f"## {backbone}" in text
        for name in (f"step_time_{backbone}.png", f"adapter_memory_{backbone}.png"):
            assert (tmp_path / "plots" / name).stat().st_size > 0
            assert f"(plots/{name})" in text
    assert "PEFT's LoRA adapts the whole fused qkv" in text


def test_long_stream_keeps_sulora_adapters_bounded(tmp_path):
    from benchmarks.perf import long_stream

    payload = long_stream.main(["--synthetic", "--out", str(tmp_path), "--experiences", "5",
                                "--num-slots", "2", "--samples", "8", "--batch-size", "8",
                                "--device", "cpu", "--no-plot"])
    records = payload["results"]["records"]
    live = {m: [r["live_adapter_values"] for r in records if r["method"] == m]
            for m in ("sulora", "sdlora")}
    assert len(live["sulora"]) == len(live["sdlora"]) == 5
    assert max(live["sulora"]) == live["sulora"][1]  # full after 2 slots, then fused
    assert live["sdlora"][-1] > 4 * live["sdlora"][0]  # one branch per experience
    assert (tmp_path / "long_stream.json").is_file()


def ddp_record(seed, world, seconds, a_last, batch=64):
    """A results record of one run of the DDP benchmark: the epochs take 80% of the training
    calls on one GPU, 60% on two."""
    return {"seed": seed, "world_size": world, "train_seconds": seconds,
            "train_epoch_seconds": seconds * (0.8 if world == 1 else 0.6),
            "train_samples": 1000, "A_last": a_last, "peak_memory_mb": 1.0,
            "config": {"training": {"epochs": 2, "batch_size": batch}}, "device": "GPU",
            "commit": {"sha": "abc"}, "benchmark": "b", "strategy": "s"}


def test_ddp_summary_averages_paired_seeds():
    from benchmarks.perf.ddp import summarize

    single = [ddp_record(0, 1, 10.0, 0.30), ddp_record(1, 1, 10.0, 0.32)]
    parallel = [ddp_record(0, 2, 5.0, 0.31), ddp_record(1, 2, 10.0 / 1.5, 0.29)]
    result = summarize(single, parallel, {"single": ["p", "-m"], "parallel": ["p", "-m"]}, 2)
    assert result["stream_speedup"] == pytest.approx((2.0 + 1.5) / 2)
    assert result["ddp_2gpu_speedup"]["value"] == pytest.approx((2.0 + 1.5) / 2 * 0.8 / 0.6)
    assert result["ddp_2gpu_a_last_delta"]["value"] == pytest.approx((1.0 - 3.0) / 2)
    assert result["ddp_2gpu_a_last_delta"]["pass"] is False
    assert [r["mode"] for r in result["runs"]] == ["single", "parallel", "single", "parallel"]
    assert "global batch 64 (32 per GPU)" in result["ddp_2gpu_speedup"]["note"]


def test_ddp_benchmark_discards_a_warm_up_pair_before_the_measured_seeds(monkeypatch, tmp_path):
    import torch

    from benchmarks.perf import ddp

    calls = []

    def fake_run(command, out, env):
        calls.append(command)
        seed = int(command[command.index("--seed") + 1])
        world = 2 if "torch.distributed.run" in command else 1
        return ddp_record(seed, world, 10.0 / world, 0.3)

    monkeypatch.setattr(ddp, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ddp.main(["--out", str(tmp_path / "ddp.json"), "--seeds", "3,4", "--epochs", "1"])
    assert len(calls) == 6
    assert all(c[c.index("--num-experiences") + 1] == "2" for c in calls[:2])
    assert not any("--num-experiences" in c for c in calls[2:])
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert [r["seed"] for r in result["runs"]] == [3, 3, 4, 4]
    assert result["warmup_experiences"] == 2


def test_report_lists_every_ddp_run(tmp_path):
    from benchmarks.perf.ddp import summarize

    commands = {"single": ["p", "-m", "single"], "parallel": ["p", "-m", "parallel"]}
    for name, batch in (("ddp.json", 128), ("ddp_batch64.json", 64)):
        runs = summarize([ddp_record(0, 1, 10.0, 0.3, batch)],
                         [ddp_record(0, 2, 6.0, 0.3, batch)], commands, 2)
        (tmp_path / name).write_text(json.dumps(runs))
    text = "\n".join(report.data_parallel(tmp_path))
    headline = text.index("### `ddp.json`: global batch 128 (the summary's entries)")
    assert headline < text.index("### `ddp_batch64.json`: global batch 64 (not in the summary)")
    assert text.count("`ddp_2gpu_speedup`: 2.222") == 2
    assert text.count("- Warm-up before the measured runs: none") == 2


def test_epoch_loading_times_every_epoch_and_is_reported(tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    from benchmarks.perf.epoch_loading import time_epochs
    from cl_sulora.training.distributed import ShardedBatchSampler
    from cl_sulora.training.loading import EpochSpanningLoader

    loader = EpochSpanningLoader(TensorDataset(torch.arange(10)),
                                 ShardedBatchSampler(10, 4, rank=0, world=1, seed=0), epochs=3)
    epochs = time_epochs(loader, 3, 0.0)
    assert len(epochs) == 3
    assert all(0 <= e["first_batch_s"] <= e["epoch_s"] for e in epochs)

    rows = [{"loader": name, "first_epoch_s": 0.4, "later_epoch_s": later,
             "later_first_batch_s": wait, "total_s": 2.0, "epochs": []}
            for name, later, wait in (("restarted every epoch", 0.3, 0.08),
                                      ("epoch-spanning", 0.23, 0.005))]
    run = {"device": "cpu", "commit": "abc1234", "results": rows,
           "settings": {"benchmark": "split-cifar100-10", "samples": 5000, "steps_per_epoch": 5,
                        "batch_size": 1024, "num_workers": 2, "epochs": 6, "step_ms": 40.0}}
    (tmp_path / "epoch_loading").mkdir()
    (tmp_path / "epoch_loading" / "epoch_loading.json").write_text(json.dumps(run))
    text = "\n".join(report.epoch_loading(tmp_path))
    assert "## Loading across epochs" in text and "`abc1234`" in text
    assert "| epoch-spanning | 400 | 230 | 5 | 2.00 |" in text


def test_eval_cache_ab_runs_both_ways_and_is_reported(tiny, tmp_path):
    from benchmarks.perf import eval_cache
    from tests.helpers import TINY_VIT

    out = tmp_path / "eval_cache"
    eval_cache.main(["--benchmark", "tiny-images", "--strategy", "sulora", "--device", "cpu",
                     "--precision", "fp32", "--epochs", "1", "--batch-size", "8",
                     "--eval-batch-size", "4", "--out", str(out), "--commit", "abc1234",
                     "--set", "backbone.name=vit_small_patch16_224",
                     f"backbone.kwargs={json.dumps(TINY_VIT)}", "out=" + str(tmp_path / "r")])
    run = json.loads((out / "eval_cache.json").read_text())
    assert [r["cache"] for r in run["runs"]] == [False, True]
    assert run["matrices_equal"] and len(run["runs"][0]["accuracy_matrix"]) == 3
    assert run["runs"][0]["cached_mb"] == 0 < run["runs"][1]["cached_mb"]
    text = "\n".join(report.eval_cache(tmp_path))
    assert "## A run end to end" in text and "Accuracy matrices of these runs equal: yes" in text
    assert text.count("| off |") == 1 and text.count("| on |") == 1


def test_eval_cache_times_one_path_alone(tiny, tmp_path):
    from benchmarks.perf import eval_cache
    from tests.helpers import TINY_VIT

    out = tmp_path / "eval_cache"
    eval_cache.main(["--benchmark", "tiny-images", "--strategy", "sulora", "--device", "cpu",
                     "--precision", "fp32", "--epochs", "1", "--batch-size", "8",
                     "--eval-batch-size", "4", "--out", str(out), "--commit", "abc1234",
                     "--modes", "on", "--set", "backbone.name=vit_small_patch16_224",
                     f"backbone.kwargs={json.dumps(TINY_VIT)}", "out=" + str(tmp_path / "r")])
    run = json.loads((out / "eval_cache.json").read_text())
    assert [r["cache"] for r in run["runs"]] == [True] and run["wall_ratio"] is None
    text = "\n".join(report.eval_cache(tmp_path))
    assert text.count("| on |") == 1 and "Without / with" not in text


def test_official_harness_counts_nested_evaluation_as_evaluation():
    """The official loop evaluates inside its training loop: that time is evaluation."""
    import time

    import torch

    from benchmarks.perf.official_sdlora import Buckets, experience_record, parse_runs

    buckets = Buckets(torch.device("cpu"))
    with buckets.part("train"):
        time.sleep(0.05)
        with buckets.part("eval"):
            time.sleep(0.1)
    parts = buckets.take()
    assert 0.04 < parts["train"] < 0.09 and parts["eval"] >= 0.1
    record = experience_record(0, 0.2, parts, train_images=10, eval_images=5)
    assert record["other_s"] == 0.2 - parts["train"] - parts["eval"]
    assert record["train_images_per_s"] == 10 / parts["train"]
    assert buckets.take() == {}
    assert parse_runs("official,sulora:bf16,sdlora:fp32:compile") == [
        ("official", "fp32", False), ("sulora", "bf16", False), ("sdlora", "fp32", True)]
    assert parse_runs("official:tf32,sulora:tf32") == [("official", "tf32", False),
                                                      ("sulora", "tf32", False)]
    for wrong in ("official:bf16", "official:fp32:compile", "official:tf32:compile"):
        with pytest.raises(SystemExit, match="float32 only"):
            parse_runs(wrong)
    with pytest.raises(SystemExit, match="PRECISION one of fp32, tf32, bf16"):
        parse_runs("sulora:fp16")
    with pytest.raises(SystemExit, match="PARTY:PRECISION"):
        parse_runs("sulora:fp32:fast")


def official_party(name, precision, seconds):
    """A party's record of one experience: ``seconds`` of training for 1,000 images."""
    from benchmarks.perf.official_sdlora import experience_record

    return {"party": name, "precision": precision, "peak_memory_mb": 1024.0, "config": None,
            "experiences": [experience_record(0, seconds + 1, {"train": seconds, "eval": 0.5},
                                              1000, 100)]}


def official_report(tmp_path, runs):
    """The comparison file of ``runs`` written as the harness writes it; its report's lines."""
    from benchmarks.perf.official_sdlora import summarize

    payload = {"device": "GPU", "commit": "abc1234def", "torch": "2", "versions": {"timm": "1"},
               "settings": {"backbone": "vit", "benchmark": "b", "image_size": 224,
                            "experiences": 1, "epochs": 1, "batch_size": 8, "workers": 0,
                            "official_config": "exps/x.json", "recipe": "paper/x"},
               "ratios_to_official": summarize(runs), "runs": runs}
    (tmp_path / "official_sdlora").mkdir(exist_ok=True)
    (tmp_path / "official_sdlora" / "official_sdlora.json").write_text(json.dumps(payload))
    return payload, "\n".join(report.official_sdlora(tmp_path))


def test_official_comparison_report_judges_the_target_from_the_ratios(tmp_path):
    from benchmarks.perf.official_sdlora import experience_record

    party = official_party
    runs = [party("official", "fp32", 2.0), party("sdlora", "fp32", 1.25),
            party("sulora", "fp32", 1.0)]
    payload, text = official_report(tmp_path, runs)
    assert payload["ratios_to_official"]["sdlora:fp32"][0]["train_images_per_s"] == \
        pytest.approx(1.6)
    assert "`abc1234`" in text and "| SD-LoRA | fp32 | 1 |" in text
    assert "- SD-LoRA, training loop: 1.60x (experiences 1-1): met." in text
    assert "- SuLoRA, training loop: 2.00x (experiences 1-1): met." in text
    runs[2]["experiences"][0] = experience_record(0, 2.5, {"train": 1.5, "eval": 0.5}, 1000, 100)
    payload, text = official_report(tmp_path, runs)
    assert "- SuLoRA, training loop: 1.33x (experiences 1-1): **not met**." in text
    compiled = party("sulora", "fp32", 4.0)  # compilation in its first epoch
    compiled["compile"] = True
    compiled["experiences"][0]["epoch_images_per_s"] = [100.0, 900.0]
    runs.append(compiled)
    payload, text = official_report(tmp_path, runs)
    assert "| SuLoRA | fp32, compiled | 1 |" in text
    assert "- SuLoRA compiled, training loop: 0.50x (experiences 1-1): **not met**." in text
    assert ("- SuLoRA compiled, its last epoch against the official training loop: 1.80x "
            "(experiences 1-1): met.") in text
    payload["settings"]["library_sets"] = ["training.divergence_check_every=1000"]
    payload["note"] = "Assembled from the parties' records."
    (tmp_path / "official_sdlora" / "official_sdlora.json").write_text(json.dumps(payload))
    text = "\n".join(report.official_sdlora(tmp_path))
    assert ("This library's parties with `--set training.divergence_check_every=1000`. "
            "Assembled from the parties' records.") in text


def test_official_comparison_pairs_each_run_with_the_official_loop_of_its_precision(tmp_path):
    party = official_party
    runs = [party("official", "fp32", 4.0), party("official", "tf32", 2.0),
            party("sulora", "tf32", 1.0), party("sulora", "fp32", 3.2),
            party("sulora", "bf16", 0.5)]
    payload, text = official_report(tmp_path, runs)
    ratios = payload["ratios_to_official"]
    assert ratios["sulora:tf32"][0]["train_images_per_s"] == pytest.approx(2.0)
    assert ratios["sulora:tf32"][0]["against"] == "official:tf32"
    assert ratios["sulora:fp32"][0]["train_images_per_s"] == pytest.approx(1.25)
    assert ratios["sulora:bf16"][0]["against"] == "official:fp32"  # no official bf16 loop
    assert ratios["sulora:bf16"][0]["train_images_per_s"] == pytest.approx(8.0)
    assert "at equal batch size and precision (fp32):\n- SuLoRA, training loop: 1.25x" in text
    assert "at equal batch size and precision (tf32):\n- SuLoRA, training loop: 2.00x" in text


def test_step_ceiling_times_every_model_kernel_and_sync(tmp_path):
    from benchmarks.perf import step_ceiling

    record = step_ceiling.main(["--tiny", "--out", str(tmp_path / "ceiling.json"),
                                "--commit", "abc"])
    cells = {(r["state"], r["sdpa"], r["sync"]) for r in record["rows"]}
    assert cells == {(state, kernel, sync) for state in ("bare", "sulora", "sdlora")
                     for kernel in ("default", "math") for sync in (False, True)}
    assert all(r["median_ms"] > 0 for r in record["rows"])
    assert record["settings"]["precision"] == "fp32" and record["profile_sulora"]["top_ops"]
    assert json.loads((tmp_path / "ceiling.json").read_text())["rows"] == record["rows"]


def test_eval_cache_profiles_one_run_on_the_host(tiny, tmp_path):
    from benchmarks.perf import eval_cache
    from tests.helpers import TINY_VIT

    out = tmp_path / "profiled"
    eval_cache.main(["--benchmark", "tiny-images", "--strategy", "sulora", "--device", "cpu",
                     "--precision", "fp32", "--epochs", "1", "--batch-size", "8",
                     "--modes", "on", "--profile", "--out", str(out),
                     "--set", "backbone.name=vit_small_patch16_224",
                     f"backbone.kwargs={json.dumps(TINY_VIT)}", "out=" + str(tmp_path / "r")])
    text = (out / "profile.txt").read_text()
    assert "run_stream" in text and "cumulative" in text
    assert not (out / "eval_cache.json").exists()
