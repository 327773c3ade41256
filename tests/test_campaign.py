"""The accuracy campaign driver: per-run commands, skipping finished runs, resuming the rest;
the variants its studies run."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from benchmarks.accuracy import campaign
from cl_sulora.runner import reproduce
from cl_sulora.runner.presets import load_preset, method_config


class FakeProcess:
    def __init__(self, cmd, stdout, stderr, env):
        self.cmd, self.env, self.returncode = cmd, env, 0
        FakeProcess.started.append(self)

    def poll(self):
        return 0


def test_campaign_skips_done_runs_resumes_checkpointed_ones_and_limits_threads(
        tmp_path, monkeypatch):
    FakeProcess.started = []
    monkeypatch.setattr(reproduce.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 16)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    (out / "pacs-dil__sdlora__seed0.done").touch()
    (ckpt / "pacs-dil__sulora-r10__seed0").mkdir(parents=True)
    (ckpt / "pacs-dil__sulora-r10__seed0" / "exp-0000").mkdir()
    # cut short while writing its first checkpoint: only the temporary folder is there
    (ckpt / "pacs-dil__inflora__seed0" / ".exp-0000.x1y2").mkdir(parents=True)
    variant = "benchmarks/accuracy/variants/sulora-r10.yaml"
    code = campaign.main(["--benchmarks", "pacs-dil",
                          "--strategies", f"sdlora,sulora,inflora,{variant}",
                          "--seeds", "0", "--parallel", "4", "--out", str(out),
                          "--checkpoint-root", str(ckpt), "--", "--epochs", "1"])
    assert code == 0
    runs = {p.cmd[p.cmd.index("--strategy") + 1]: p for p in FakeProcess.started}
    assert set(runs) == {"sulora", "inflora", variant}  # sdlora was done
    assert "--resume-fallback" in runs[variant].cmd
    assert "--resume-fallback" not in runs["sulora"].cmd
    assert "--resume-fallback" not in runs["inflora"].cmd  # it has nothing to resume from
    assert runs["sulora"].cmd[-4:-2] == ["--epochs", "1"]
    assert all(p.env["OMP_NUM_THREADS"] == "4" for p in FakeProcess.started)
    assert (out / "pacs-dil__sulora-r10__seed0.done").exists()


class CheckpointingProcess(FakeProcess):
    """Writes a checkpoint into its --checkpoint-dir; the run of seed 1 fails."""

    def __init__(self, cmd, stdout, stderr, env):
        super().__init__(cmd, stdout, stderr, env)
        (Path(cmd[cmd.index("--checkpoint-dir") + 1]) / "exp-0000").mkdir(parents=True)
        self.returncode = int(cmd[cmd.index("--seed") + 1] == "1")


def test_campaign_removes_a_finished_runs_checkpoints_unless_asked_and_keeps_a_failed_ones(
        tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce.subprocess, "Popen", CheckpointingProcess)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    for keep in (False, True):
        FakeProcess.started = []
        out, ckpt = tmp_path / f"out-{keep}", tmp_path / f"ckpt-{keep}"
        flags = ["--keep-checkpoints"] if keep else []
        code = campaign.main(["--benchmarks", "pacs-dil", "--strategies", "sulora", "--seeds",
                              "0,1", "--parallel", "2", "--out", str(out), "--checkpoint-root",
                              str(ckpt), *flags])
        assert code == 1 and len(FakeProcess.started) == 2
        assert (out / "pacs-dil__sulora__seed0.done").exists()
        assert not (out / "pacs-dil__sulora__seed1.done").exists()
        assert (ckpt / "pacs-dil__sulora__seed0").exists() == keep  # its record is written
        assert (ckpt / "pacs-dil__sulora__seed1" / "exp-0000").is_dir()  # resumes next time


class OutOfMemoryOnce(FakeProcess):
    """Writes a checkpoint into its --checkpoint-dir; seed 1 fails the first time it starts (as
    a run does when the runs beside it fill the GPU's memory), seed 2 every time."""

    def __init__(self, cmd, stdout, stderr, env):
        super().__init__(cmd, stdout, stderr, env)
        (Path(cmd[cmd.index("--checkpoint-dir") + 1]) / "exp-0000").mkdir(parents=True,
                                                                          exist_ok=True)
        seed = cmd[cmd.index("--seed") + 1]
        starts = sum(p.cmd[p.cmd.index("--seed") + 1] == seed for p in FakeProcess.started)
        self.returncode = int(seed == "2" or (seed == "1" and starts == 1))


def test_campaign_starts_failed_runs_again_with_fewer_side_by_side_resuming_them(
        tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce.subprocess, "Popen", OutOfMemoryOnce)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 16)

    def campaign_of(seeds, retries):
        FakeProcess.started = []
        out, ckpt = tmp_path / f"out-{retries}", tmp_path / f"ckpt-{retries}"
        code = campaign.main(["--benchmarks", "pacs-dil", "--strategies", "sulora", "--seeds",
                              seeds, "--parallel", "4", "--out", str(out), "--checkpoint-root",
                              str(ckpt), "--retries", str(retries)])
        return code, out, [(p.cmd[p.cmd.index("--seed") + 1], "--resume-fallback" in p.cmd,
                            p.env["OMP_NUM_THREADS"]) for p in FakeProcess.started]

    code, out, started = campaign_of("0,1", 1)
    assert code == 0
    # seed 1 again, alone after the others ended, with 2 side by side (16 cores / 2 = 8
    # threads), from the checkpoint its first start wrote
    assert started == [("0", False, "4"), ("1", False, "4"), ("1", True, "8")]
    assert (out / "pacs-dil__sulora__seed1.done").exists()
    # a run that fails every time: started 1 + 2 times, 4, then 2, then 1 side by side
    code, out, started = campaign_of("0,2", 2)
    assert code == 1
    assert started == [("0", False, "4"), ("2", False, "4"), ("2", True, "8"), ("2", True, "16")]
    assert not (out / "pacs-dil__sulora__seed2.done").exists()
    code, _, started = campaign_of("0,1", 0)  # no retry: as before
    assert code == 1 and [s[0] for s in started] == ["0", "1"]


def test_campaign_runs_a_job_file_each_in_its_folder_with_its_arguments(tmp_path, monkeypatch):
    FakeProcess.started = []
    monkeypatch.setattr(reproduce.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(reproduce.time, "sleep", lambda s: None)
    listed = tmp_path / "jobs.txt"
    listed.write_text("# folder benchmark strategy seed args\n"
                      "glue-task split-glue sulora 1 --protocol task-incremental\n"
                      "\n"
                      "glue-class split-glue sulora 1 --protocol 'class-incremental'  # CIL\n")
    out = tmp_path / "out"
    assert campaign.main(["--jobs", str(listed), "--parallel", "2", "--out", str(out), "--",
                          "--epochs", "1"]) == 0
    cmds = [p.cmd for p in FakeProcess.started]
    assert [c[c.index("--out") + 1] for c in cmds] == [str(out / "glue-task"),
                                                       str(out / "glue-class")]
    assert [c[-4:] for c in cmds] == [["--protocol", "task-incremental", "--epochs", "1"],
                                      ["--protocol", "class-incremental", "--epochs", "1"]]
    assert (out / "glue-task" / "split-glue__sulora__seed1.done").exists()
    assert (out / "glue-class" / "split-glue__sulora__seed1.done").exists()


def test_summarize_pools_stream_orders_and_plots_accuracy_against_memory(tmp_path):
    import json

    from benchmarks.accuracy import summarize
    from cl_sulora.runner.report import memory_points

    def record(strategy, seed, a_last, live, order=None):
        matrix = [[a_last, 0.0], [a_last, a_last]]
        return {"strategy": strategy, "seed": seed, "benchmark": "long-text",
                "protocol": "class-incremental", "backbone": "minilm-l6", "device": "cpu",
                "accuracy_matrix": matrix, "A_last": a_last, "live_adapter_params": live,
                "stored_state_params": 0, "train_seconds": 1.0,
                "config": {"training": {"epochs": 1},
                           "data": {"order_seed": seed if order is None else order}}}

    for k, (a, b) in enumerate([(0.40, 0.30), (0.44, 0.32)]):
        folder = tmp_path / f"order{k}"
        folder.mkdir()
        for strategy, acc, live in (("sulora", a, 100), ("frozen", b, 0)):
            name = f"long-text-class-incremental-order{k}__{strategy}__seed{k}.json"
            (folder / name).write_text(json.dumps(record(strategy, k, acc, live)))
    assert summarize.main([str(tmp_path), "--orders"]) == 0
    label = "long-text-class-incremental"
    table = (tmp_path / f"{label}__compare.md").read_text()
    assert "| sulora | 42.0 ± 2.8 |" in table and "| 0,1 |" in table
    assert (tmp_path / f"{label}__memory.png").stat().st_size > 0
    records = summarize.group_results(tmp_path, orders=True)[label]
    points = {p[0]: p[1:] for p in memory_points(records)}
    assert points["frozen"][0] == 0 and points["sulora"][0] == 100
    assert abs(points["sulora"][1] - 0.42) < 1e-12 and points["sulora"][3] == 2
    assert abs(points["sulora"][2] - 0.02828427) < 1e-6  # the sample std of 0.40 and 0.44
    assert (tmp_path / f"{label}__memory-kept.png").stat().st_size > 0

    # --with: another folder's strategies join the table; those the folder has are its own
    def write(root, strategy, order, seed, acc):
        folder = root / "class" / f"order{order}"  # not the folder layout of tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{label}-order{order}__{strategy}__seed{seed}.json"
        (folder / name).write_text(json.dumps(record(strategy, seed, acc, 0, order=order)))

    other, third = tmp_path.parent / "closed-form", tmp_path.parent / "baselines"
    for k in (0, 1):
        for strategy, acc in (("ranpac", 0.5), ("sulora", 0.9), ("sdlora", 0.6)):
            write(other, strategy, k, k, acc)
    flags = ["--with", str(other), "ranpac", "sulora"]
    assert summarize.main([str(tmp_path), "--orders", *flags]) == 0
    table = (tmp_path / f"{label}__compare.md").read_text()
    assert "| ranpac | 50.0 ± 0.0 |" in table and "| sulora | 42.0 ± 2.8 |" in table
    assert "sdlora" not in table
    assert "- device: cpu\n" in table  # one device: named alone
    # --with again: a third folder adds what neither of the first two gave
    for k in (0, 1):
        for strategy, acc in (("ranpac", 0.1), ("sdlora", 0.7)):
            write(third, strategy, k, k, acc)
    flags += ["--with", str(third), "ranpac", "sdlora"]
    assert summarize.main([str(tmp_path), "--orders", *flags]) == 0
    table = (tmp_path / f"{label}__compare.md").read_text()
    assert "| ranpac | 50.0 ± 0.0 |" in table and "| sdlora | 70.0 ± 0.0 |" in table
    assert "paired" not in table  # every strategy has every run

    # strategies with other runs: the table keeps those made in the orders and seeds all have
    write(other, "ranpac", 0, 1, 0.8)  # order 0, another seed: no other strategy has it
    (third / "class" / "order1" / f"{label}-order1__sdlora__seed1.json").unlink()  # order 1 missing
    assert summarize.main([str(tmp_path), "--orders", *flags]) == 0
    table = (tmp_path / f"{label}__compare.md").read_text()
    for row in ("sulora | 40.0 |", "frozen | 30.0 |", "ranpac | 50.0 |", "sdlora | 70.0 |"):
        assert f"| {row}" in table  # order 0, seed 0 only
    paired = next(line for line in table.splitlines() if line.startswith("- paired: "))
    assert paired.startswith("- paired: only the 1 stream orders x seeds that every strategy "
                              "has; left out: ")
    left_out = paired.split("left out: ")[1].split("; ")
    assert sorted(left_out) == ["frozen (order_seed 1, seed 1)", "ranpac (order_seed 0, seed 1)",
                                "ranpac (order_seed 1, seed 1)", "sulora (order_seed 1, seed 1)"]
    from cl_sulora.runner.report import devices
    mixed = [{"device": "H200"}, {"device": "H100"}, {"device": "H100"}]
    assert devices(mixed) == "H100 (2 runs), H200 (1 run)"


def test_memory_measures_and_dominance():
    from cl_sulora.runner.report import dominated, memory_points

    def record(strategy, a_last, live, stored, aligned, joint=False):
        matrix = [[a_last, a_last]] if joint else [[a_last, 0.0], [a_last, a_last]]
        return {"strategy": strategy, "seed": 0, "accuracy_matrix": matrix,
                "A_last": a_last, "live_adapter_params": live, "stored_state_params": stored,
                "alignment_stored_params": aligned}

    records = [record("sulora-s5", 0.52, 100, 50, 1000), record("sulora", 0.53, 200, 50, 1000),
               record("ranpac", 0.535, 0, 10**6, None), record("frozen", 0.40, 0, 0, 1000),
               record("sdlora", 0.525, 500, 0, 1000),
               record("jointlora", 0.61, 50, 0, 1000, joint=True)]
    live = {p[0]: p[1] for p in memory_points(records, "live")}
    kept = {p[0]: p[1] for p in memory_points(records, "kept")}
    assert live == {"sulora-s5": 100, "sulora": 200, "ranpac": 0, "frozen": 0, "sdlora": 500,
                    "jointlora": 50}
    assert kept == {"sulora-s5": 1150, "sulora": 1250, "ranpac": 10**6, "frozen": 1000,
                    "sdlora": 1500, "jointlora": 1050}
    # RanPAC: more accurate than both SuLoRA points at no live adapter value, but it keeps a
    # million values; SD-LoRA is above sulora-s5 but with more memory; JointLoRA is a bound
    # (a joint run), unless its record is of a continual run
    assert dominated(records, "live") == [("ranpac", "sulora-s5"), ("ranpac", "sulora")]
    assert dominated(records, "kept") == []
    continual = [*records[:-1], record("jointlora", 0.61, 50, 0, 1000)]
    assert dominated(continual, "kept") == [("jointlora", "sulora-s5"), ("jointlora", "sulora")]


def test_slot_budget_variants_differ_from_the_preset_in_the_slot_count_only():
    """The long-stream studies compare SuLoRA's budgets: `sulora-s<N>` must be the shipped preset
    with N slots, every other value (and the training settings) the preset's."""

    def resolved(preset):
        config = method_config(preset.spec, preset.method, where=str(preset.path), fix="")
        return dataclasses.asdict(config), preset.training

    base, base_training = resolved(load_preset("sulora"))
    variants = sorted(Path("benchmarks/accuracy/variants").glob("sulora-s*.yaml"))
    assert {p.name for p in variants} >= {"sulora-s5.yaml", "sulora-s20.yaml"}
    for path in variants:
        slots = int(re.fullmatch(r"sulora-s(\d+)\.yaml", path.name).group(1))
        method, training = resolved(load_preset(str(path)))
        assert method == {**base, "num_slots": slots}, path.name
        assert training == base_training, path.name
