"""Fault injection through the command line: bad outputs, used and damaged checkpoint folders,
sweeps into one folder, divergence, bad data, bad weights, bad flags and Ctrl-C. Each case checks
the exit status (2 bad input, 3 checkpoint, 4 divergence, 130 interrupted), that the message
names the problem without a traceback, and that no finished work is lost or trained for
nothing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from cl_sulora.benchmarks import BENCHMARKS
from cl_sulora.runner import cli, loop
from cl_sulora.runner.checkpoint import checkpoints, latest_checkpoint, sealed
from tests.helpers import SLOW_RUN, TINY_VIT, tiny_flags, tiny_images, write_cifar

#: Somewhere no process can create a folder, root included.
UNWRITABLE = "/proc/cl-sulora-cannot-write-here"


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "tiny-images", tiny_images)


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as training."""
    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "run_stream", trained)


def fails(argv, capsys, status: int, *expected: str) -> str:
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def record_of_another_config(path: Path) -> None:
    """A record at ``path`` of a run with another learning rate than the tiny runs'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": {"training": {"lr": 0.001}}}))


# ----------------------------------------------------------------------------- 1. outputs
def test_an_out_that_is_a_file_is_refused_before_training(tiny, no_training, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = with_flag(tiny_flags(tmp_path), "--out", str(tmp_path / "file"))
    fails(argv, capsys, 2, "--out", "is a file, not a folder")


@pytest.mark.parametrize("flag", ["--out", "--checkpoint-dir"])
def test_an_unwritable_output_is_refused_before_training(tiny, no_training, tmp_path, capsys,
                                                         flag):
    fails(with_flag(tiny_flags(tmp_path), flag, UNWRITABLE), capsys, 2, flag, "not writable")


def test_a_record_that_cannot_be_written_at_the_end_goes_to_a_fallback(tiny, tmp_path, capsys,
                                                                       monkeypatch):
    from cl_sulora.runner import records

    monkeypatch.setattr(records, "FALLBACK_DIR", tmp_path / "fallback")
    real = records.atomic_write_json

    def broken_out(path, record):
        if tmp_path / "results" in Path(path).parents:
            raise PermissionError(13, "Permission denied")
        return real(path, record)

    monkeypatch.setattr(records, "atomic_write_json", broken_out)
    with pytest.warns(UserWarning, match="the record is at"):
        assert cli.main(tiny_flags(tmp_path)) == 0
    assert (tmp_path / "fallback" / "tiny-images__sulora__seed0.json").is_file()
    assert "the record is at" in capsys.readouterr().out


# ----------------------------------------------------------------- 2-4. checkpoint folders
def test_a_new_run_in_a_used_checkpoint_folder_is_refused(tiny, tmp_path, capsys):
    argv = [*tiny_flags(tmp_path), "--num-experiences", "2"]
    assert cli.main(argv) == 0
    first = [p.name for p in checkpoints(tmp_path / "ckpt")]
    capsys.readouterr()
    fails([*argv, "--seed", "1"], capsys, 2, "holds checkpoints of an earlier run", "--resume",
          "--overwrite-checkpoints")
    assert [p.name for p in checkpoints(tmp_path / "ckpt")] == first  # nothing lost
    assert cli.main([*argv, "--seed", "1", "--overwrite-checkpoints"]) == 0


def test_overwrite_checkpoints_discards_nothing_until_the_new_run_has_a_checkpoint(
        tiny, tmp_path, capsys):
    argv = tiny_flags(tmp_path)
    assert cli.main(argv) == 0
    folder = tmp_path / "ckpt"
    before = {p.name: (p / "model.safetensors").read_bytes() for p in checkpoints(folder)}
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps(
        {"timm_model_name": "vit_small_patch16_224", "timm_kwargs": TINY_VIT}))
    (weights / "model.safetensors").write_bytes(b"not safetensors")
    broken = [*argv, "--seed", "1", "--overwrite-checkpoints", "--backbone-weights", str(weights)]
    broken.remove("--backbone")
    broken.remove("vit_small_patch16_224")
    capsys.readouterr()
    fails(broken, capsys, 2, "not a readable safetensors file")
    after = {p.name: (p / "model.safetensors").read_bytes() for p in checkpoints(folder)}
    assert after == before  # the failed run discarded nothing
    # a shorter new run: the old run's later checkpoints go, the new ones stay
    shorter = [*argv, "--seed", "1", "--num-experiences", "2", "--overwrite-checkpoints"]
    assert cli.main(shorter) == 0
    assert [p.name for p in checkpoints(folder)] == ["exp-0000", "exp-0001"]
    seeds = {json.loads((p / "meta.json").read_text())["config"]["seed"]
             for p in checkpoints(folder)}
    assert seeds == {1}
    assert latest_checkpoint(folder).position == 1


def test_a_resumed_run_does_not_replace_the_record_of_another_config(tiny, tmp_path, capsys):
    record = tmp_path / "results" / "tiny-images__sulora__seed0.json"
    longer = [*tiny_flags(tmp_path), "--num-experiences", "2", "--epochs", "2"]
    assert cli.main(longer) == 0  # run B, checkpointed
    # a resume may replace its run's own record (and may lower the learning rate)
    assert cli.main([*longer, "--resume", "--lr", "0.0005"]) == 0
    # run A, one epoch, into the same folder, replacing B's record on purpose
    assert cli.main([*tiny_flags(tmp_path), "--num-experiences", "2", "--overwrite",
                     "--checkpoint-dir", str(tmp_path / "a")]) == 0
    finished = record.read_bytes()
    capsys.readouterr()
    fails([*longer, "--resume"], capsys, 2, "holds the record of a run with another config",
          "training.epochs: 1 -> 2", "--overwrite")
    assert record.read_bytes() == finished
    assert cli.main([*longer, "--resume", "--overwrite"]) == 0
    assert json.loads(record.read_text())["config"]["training"]["epochs"] == 2


def test_edited_metadata_is_detected_and_nothing_is_overwritten(tiny, tmp_path, capsys):
    argv = tiny_flags(tmp_path)
    assert cli.main(argv) == 0
    newest = checkpoints(tmp_path / "ckpt")[-1]
    meta = json.loads((newest / "meta.json").read_text())
    meta["position"] = 0  # retrain from the start on resume, overwriting both checkpoints
    (newest / "meta.json").write_text(json.dumps(meta))
    before = {p.name: (p / "model.safetensors").read_bytes()
              for p in checkpoints(tmp_path / "ckpt")}
    capsys.readouterr()
    fails([*argv, "--resume"], capsys, 3, "meta.json: edited or damaged")
    after = {p.name: (p / "model.safetensors").read_bytes()
             for p in checkpoints(tmp_path / "ckpt")}
    assert after == before
    # resealed by hand, the position still disagrees with the folder and the state
    (newest / "meta.json").write_text(json.dumps(sealed(meta)))
    fails([*argv, "--resume"], capsys, 3, "does not match the folder")


def test_fallback_skips_a_state_file_that_does_not_unpickle(tiny, tmp_path, capsys):
    argv = tiny_flags(tmp_path)
    assert cli.main(argv) == 0
    newest = checkpoints(tmp_path / "ckpt")[-1]
    garbage = b"\x80\x05not a pickle"
    (newest / "state.pt").write_bytes(garbage)
    meta = json.loads((newest / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256(garbage).hexdigest()  # checksums consistent
    (newest / "meta.json").write_text(json.dumps(sealed(meta)))
    capsys.readouterr()
    fails([*argv, "--resume"], capsys, 3, "cannot be decoded", "--resume-fallback")
    assert cli.main([*argv, "--resume-fallback"]) == 0
    assert latest_checkpoint(tmp_path / "ckpt").position == 2


def test_temporary_folders_of_interrupted_writes_are_removed(tiny, tmp_path):
    argv = [*tiny_flags(tmp_path), "--num-experiences", "2"]
    assert cli.main(argv) == 0
    leftover = tmp_path / "ckpt" / ".exp-0002.abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    assert cli.main([*argv, "--resume"]) == 0
    assert not leftover.exists()


# --------------------------------------------------------------------------- 5. sweeps
def test_a_sweep_into_one_folder_does_not_silently_replace_records(tiny, tmp_path, capsys,
                                                                   no_training):
    record_of_another_config(tmp_path / "results" / "tiny-images__sulora__seed0.json")
    argv = [*tiny_flags(tmp_path), "--lr", "0.002"]
    fails(argv, capsys, 2, "holds the record of a run with another config", "--overwrite")


# ------------------------------------------------------------------------ 6-7. divergence
@pytest.mark.parametrize("value", [".inf", ".nan", "-1e-3"])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(tiny, no_training,
                                                                    tmp_path, capsys, value):
    fails([*tiny_flags(tmp_path), "--set", f"training.lr={value}"], capsys, 2, "training.lr")


def test_an_exploding_learning_rate_stops_the_run_without_a_checkpoint(tiny, tmp_path, capsys):
    argv = [*tiny_flags(tmp_path), "--lr", "1e9"]
    fails(argv, capsys, 4, "training diverged at experience 1/3", "exceeded 1e+06")
    assert checkpoints(tmp_path / "ckpt") == []
    assert not (tmp_path / "results" / "tiny-images__sulora__seed0.json").exists()


# ---------------------------------------------------------------------------- 8. bad data
def test_a_corrupt_image_is_found_when_the_benchmark_is_built(tmp_path, capsys, no_training):
    from tests.benchmarks.test_benchmarks import write_pacs

    write_pacs(tmp_path / "pacs-64")
    bad = sorted((tmp_path / "pacs-64" / "train" / "cartoon").rglob("*.*"))[0]
    bad.write_bytes(b"")  # an empty file in experience 2
    argv = ["run", "--benchmark", "pacs-dil", "--strategy", "sulora", "--data-root",
            str(tmp_path), "--backbone", "vit_small_patch16_224", "--set",
            f"backbone.kwargs={json.dumps(TINY_VIT)}", "--device", "cpu", "--out",
            str(tmp_path / "out")]
    fails(argv, capsys, 2, str(bad), "not a readable image")


@pytest.mark.parametrize("damage", ["zeros", "checksum"])
def test_cifar_files_that_are_not_cifar_are_refused(tmp_path, capsys, no_training, damage):
    write_cifar(tmp_path / "cifar-100-python")
    train = tmp_path / "cifar-100-python" / "train"
    raw = pickle.loads(train.read_bytes())
    if damage == "zeros":
        raw["data"] = raw["data"] * 0
        train.write_bytes(pickle.dumps(raw))
        from cl_sulora.benchmarks.cifar100 import KNOWN_MD5

        KNOWN_MD5["train"].add(hashlib.md5(train.read_bytes()).hexdigest())
        expected = "every image is all zeros"
    else:
        raw["data"][0, 0] ^= 1  # one bit of one pixel
        train.write_bytes(pickle.dumps(raw))
        expected = "data.verify_checksums=false"
    argv = ["run", "--benchmark", "split-cifar100-10", "--strategy", "sulora", "--data-root",
            str(tmp_path), "--backbone", "vit_small_patch16_224", "--set",
            f"backbone.kwargs={json.dumps(TINY_VIT)}", "--device", "cpu", "--out",
            str(tmp_path / "out")]
    fails(argv, capsys, 2, str(train), expected)


def test_rows_of_unknown_labels_are_reported_with_their_count(tmp_path):
    from cl_sulora.benchmarks.common import read_text_task

    task = tmp_path / "t"
    task.mkdir()
    (task / "labels.json").write_text(json.dumps(["a", "b"]))
    rows = [{"sentence": "x", "label": "a"}, {"sentence": "y", "label": "-"},
            {"sentence": "z", "label": "?"}]
    (task / "train.json").write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="2 row.s. whose label is not one of"):
        loaded = read_text_task(task, "t", 0.5, seed=0, with_test=False)
    assert loaded.dropped["train"] == 2


def test_an_empty_train_file_is_refused(tmp_path, capsys, no_training):
    from tests.benchmarks.test_benchmarks import write_cl_benchmark

    write_cl_benchmark(tmp_path / "CL_Benchmark")
    (tmp_path / "CL_Benchmark" / "SC" / "amazon" / "train.json").write_text("[]")
    argv = ["run", "--benchmark", "sentiment-dil", "--strategy", "sulora", "--data-root",
            str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out")]
    fails(argv, capsys, 2, "amazon/train.json has no row to train on")


# ------------------------------------------------------------------------ 9. user input
def test_a_backbone_of_the_other_modality_is_named_before_the_data_is_read(tiny, tmp_path,
                                                                            capsys, no_training):
    argv = tiny_flags(tmp_path)
    argv[argv.index("tiny-images")] = "bbc-news"
    fails(argv, capsys, 2, "benchmark 'bbc-news' is text but backbone", "is for image",
          "give a backbone for text")


def test_compare_checks_every_record_and_repeated_runs_before_training(tiny, tmp_path, capsys,
                                                                        no_training):
    record_of_another_config(tmp_path / "results" / "tiny-images__seqlora__seed0.json")
    flags = tiny_flags(tmp_path)[5:-2]  # no run, strategy, benchmark or checkpoint dir
    compare = ["compare", "--benchmark", "tiny-images", *flags]
    fails([*compare, "--strategies", "sulora,seqlora"], capsys, 2,
          "tiny-images__seqlora__seed0.json holds the record of a run with another config")
    fails([*compare, "--strategies", "sulora,sulora"], capsys, 2,
          "name sulora seed 0 more than once")


def test_weights_that_are_not_safetensors_are_refused(tmp_path, capsys, no_training, tiny):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps(
        {"timm_model_name": "vit_small_patch16_224", "timm_kwargs": TINY_VIT}))
    (weights / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, say")
    argv = [*tiny_flags(tmp_path), "--backbone-weights", str(weights)]
    argv.remove("--backbone")
    argv.remove("vit_small_patch16_224")
    fails(argv, capsys, 2, "model.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("flags, expected", [
    (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["--class-order-seed", "-1"], "class_order_seed (data.class_order_seed) must be"),
])
def test_negative_seeds_name_their_flag(tmp_path, capsys, flags, expected):
    write_cifar(tmp_path / "cifar-100-python")
    argv = ["run", "--benchmark", "split-cifar100-10", "--strategy", "sulora", "--data-root",
            str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out"), *flags]
    fails(argv, capsys, 2, expected)


def test_a_preset_name_is_never_a_file_of_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sulora").write_text("strategy: naive\n")  # a stray file named like a preset
    from cl_sulora.runner.presets import load_preset

    assert load_preset("sulora").spec.name == "sulora"
    (tmp_path / "mine.yaml").write_text("strategy: naive\n")
    assert load_preset("mine.yaml").spec.name == "naive"
    with pytest.raises(Exception, match="unknown strategy 'mine'"):
        load_preset("mine")


# ----------------------------------------------------------------------------- 6. Ctrl-C
def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def stopped(argv, capsys, *expected: str) -> str:
    """:func:`fails` with status 130, for a command that Ctrl-C stops (an interrupt escaping
    the command line fails the test rather than stopping pytest)."""
    try:
        return fails(argv, capsys, 130, *expected)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.main")


def test_ctrl_c_of_a_run_exits_130_with_one_line_saying_how_to_resume(tiny, tmp_path, capsys,
                                                                       monkeypatch):
    argv = tiny_flags(tmp_path)
    bars = []

    def interrupted_training(*args, **kwargs):
        bars.append(tqdm(total=10, desc="train", leave=False))  # the interrupted run's bar
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_stream", interrupted_training)
    err = stopped(argv, capsys, "interrupted before a checkpoint was written in")
    # one line, on a line of its own: the bar is closed first
    assert re.split(r"[\r\n]", err.rstrip("\n"))[-1].startswith("interrupted before")
    # stopped after a checkpoint: the same command plus --resume continues
    monkeypatch.undo()
    monkeypatch.setitem(BENCHMARKS, "tiny-images", tiny_images)
    assert cli.main(argv) == 0
    capsys.readouterr()
    monkeypatch.setattr(cli, "run_one", interrupt)
    ckpt = tmp_path / "ckpt"
    stopped(argv, capsys, f"interrupted; the same command plus --resume continues the run "
                          f"from its last checkpoint in {ckpt}")
    stopped([*argv, "--resume"], capsys, "interrupted; the same command continues the run")
    stopped([*argv, "--overwrite-checkpoints"], capsys,
            "with --resume instead of --overwrite-checkpoints")
    # without a checkpoint folder nothing more is promised; nor for compare or eval
    at = argv.index("--checkpoint-dir")
    assert stopped(argv[:at] + argv[at + 2:], capsys).strip() == "interrupted"
    monkeypatch.setattr(cli, "compare", interrupt)
    monkeypatch.setattr(cli, "evaluate", interrupt)
    for argv in (["compare", "--benchmark", "tiny-images", "--strategies", "sulora"],
                 ["eval", "--checkpoint", str(ckpt)]):
        assert stopped(argv, capsys).strip() == "interrupted"


#: ``cl-sulora reproduce`` whose runs are two long processes, stopped by a real ``SIGINT``.
REPRODUCE_INTERRUPTED = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, wherever started
# the real package (the checkout's, or the installed one), not the slow run in this folder
sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p not in ("", os.getcwd())]
from pathlib import Path
from cl_sulora.runner import cli, reproduce
folder = Path(sys.argv[2])

def runs(args):
    reproduce.run_processes([([str(folder / f"pid{i}")], folder / f"log{i}") for i in range(2)],
                            2, lambda index, status, seconds: None)
    return 0

cli.reproduce = runs
raise SystemExit(cli.main(["reproduce", "cifar100-10"]))
"""


def test_ctrl_c_of_reproduce_stops_its_runs_and_exits_130_without_a_traceback(tmp_path):
    (tmp_path / "cl_sulora").mkdir()
    (tmp_path / "cl_sulora" / "__init__.py").touch()  # a package, found before the real one
    (tmp_path / "cl_sulora" / "__main__.py").write_text(SLOW_RUN)
    root = Path(cli.__file__).parents[2]
    driver = subprocess.Popen(
        [sys.executable, "-c", REPRODUCE_INTERRUPTED, str(root), str(tmp_path)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 120
    while not all(p.exists() and p.read_text() for p in pids):
        assert time.monotonic() < deadline and driver.poll() is None, driver.stderr.read()
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    assert err.strip() == ("interrupted; the same command continues it (runs whose record is "
                           "written are skipped)")
    for pid in (int(p.read_text()) for p in pids):
        with pytest.raises(ProcessLookupError):  # stopped and waited for
            os.kill(pid, 0)


# ----------------------------------------------------------------------------- 7. the demo
@pytest.mark.parametrize("flags", [
    ["--checkpoint-dir", "ck"], ["--checkpoint-dir", "ck", "--resume"],
    ["--checkpoint-dir", "ck", "--resume-fallback"],
    ["--checkpoint-dir", "ck", "--overwrite-checkpoints"], ["--no-report"],
])
def test_the_demo_refuses_the_flags_of_a_single_run(flags, tmp_path, capsys, monkeypatch):
    def compared(*args, **kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(cli, "compare", compared)
    monkeypatch.chdir(tmp_path)
    named = ", ".join(flag for flag in flags if flag.startswith("--"))
    fails(["run", *flags, "--epochs", "1"], capsys, 2, f"{named}: the demo",
          "give --benchmark and --strategy for a single run")
    assert not list(tmp_path.iterdir())
