"""Reliability of runs: kill and resume exactly, damaged checkpoints, config validation before
training, non-finite loss and missing data reported cleanly, exact save/load round trips, runs
side by side stopped with their driver."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl_sulora import (
    SubspaceLoRAConfig,
    add_subspace_lora,
    load_subspace_lora,
    save_subspace_lora,
    subspace_lora_layers,
)
from cl_sulora.adapters.serialization import adapter_state
from cl_sulora.benchmarks import BENCHMARKS, build_benchmark
from cl_sulora.linalg import directions_outside
from cl_sulora.runner import cli, loop
from cl_sulora.runner.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers import SLOW_RUN, fill_slot, tiny_flags, tiny_images

ROOT = Path(__file__).resolve().parents[2]

#: ``cl-sulora`` with the tiny benchmark registered; with $STALL set it touches that file in the
#: first training iteration of experience 1 and sleeps there, to be killed mid-experience.
SCRIPT = """
import functools, os, sys, time
from pathlib import Path
from avalanche.core import SupervisedPlugin
from cl_sulora.runner import cli, loop
from cl_sulora.benchmarks import BENCHMARKS
from tests.helpers import tiny_images

class Stall(SupervisedPlugin):
    def after_training_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1 and os.environ.get("STALL"):
            Path(os.environ["STALL"]).touch()
            time.sleep(120)

BENCHMARKS["tiny-images"] = tiny_images
cli.run = functools.partial(loop.run, plugins=[Stall()])
sys.exit(cli.main(sys.argv[1:]))
"""


def record(out: Path, strategy: str) -> dict:
    return json.loads((out / "results" / f"tiny-images__{strategy}__seed0.json").read_text())


def model_sha(out: Path) -> str:
    """Checksum of the model tensors after the last experience."""
    return load_checkpoint(checkpoints(out / "ckpt")[-1]).meta["sha256"]["model.safetensors"]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "tiny-images", tiny_images)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, in this process: ``{strategy: output folder}``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BENCHMARKS, "tiny-images", tiny_images)
        outs = {}
        for strategy in ("sulora", "sdlora"):
            out = tmp_path_factory.mktemp(strategy)
            assert cli.main(tiny_flags(out, strategy)) == 0
            outs[strategy] = out
        return outs


def spawn(argv: list[str], stall: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "STALL"}
    if stall is not None:
        env["STALL"] = str(stall)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------- kill and resume
@pytest.mark.parametrize("strategy", ["sulora", "sdlora"])
def test_sigkill_mid_experience_then_resume_matches_an_uninterrupted_run(
    strategy, reference, tmp_path
):
    argv, stall = tiny_flags(tmp_path, strategy), tmp_path / "stalled"
    process = spawn(argv, stall)
    deadline = time.monotonic() + 120
    while not stall.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "experience 1 never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert [p.name for p in checkpoints(tmp_path / "ckpt")] == ["exp-0000"]

    resumed = spawn([*argv, "--resume"])
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    expected = reference[strategy]
    assert record(tmp_path, strategy)["accuracy_matrix"] == record(expected, strategy)[
        "accuracy_matrix"
    ]
    assert model_sha(tmp_path) == model_sha(expected)  # bit-identical model


# ------------------------------------------------------------------------ damaged checkpoints
def test_truncated_checkpoint_is_named_and_fallback_only_when_asked(
    tiny, reference, tmp_path, capsys
):
    argv = tiny_flags(tmp_path)
    assert cli.main(argv) == 0
    newest = checkpoints(tmp_path / "ckpt")[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:500])
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 3  # a checkpoint problem
    err = capsys.readouterr().err
    assert f"{newest}: truncated or corrupted" in err and "Traceback" not in err
    assert cli.main([*argv, "--resume-fallback"]) == 0  # redoes the last experience
    assert "resumed from" in "".join(capsys.readouterr())
    expected = reference["sulora"]
    assert record(tmp_path, "sulora")["accuracy_matrix"] == record(expected, "sulora")[
        "accuracy_matrix"
    ]
    assert model_sha(tmp_path) == model_sha(expected)


def test_resume_with_another_config_names_the_keys(tiny, tmp_path, capsys):
    argv = [*tiny_flags(tmp_path), "--num-experiences", "2"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--epochs", "2", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "training.epochs: 1 -> 2" in err and "same flags" in err
    assert "training.lr" not in err  # the optimizer's hyperparameters may change on resume


def test_resume_is_refused_for_replay(tiny, tmp_path, capsys):
    assert cli.main([*tiny_flags(tmp_path, "replay"), "--resume"]) == 2
    assert "not supported for 'replay'" in capsys.readouterr().err


# ------------------------------------------------------------- config validation before training
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "training.nope=1"], ["training.nope: unknown key", "valid keys"]),
        (["--set", "training.epochs=many"], ["training.epochs", "fix the flag or --set"]),
        (["--set", "method.rnak=2"], ["method.rnak", "valid method keys"]),
        (["--set", "method.rank=20", "method.num_slots=3"],
         ["rank x num_slots = 20 x 3 = 60 exceeds the input dimension 48", "Lower rank",
          "method.* keys"]),
        (["--set", "method.fusion=never", "method.num_slots=2"],
         ["3 experiences but num_slots=2 with fusion='never'", "Set num_slots >= 3"]),
        (["--set", "method.target_modules=[nothing]"],
         ["target_modules ['nothing'] match no nn.Linear", "Candidate Linear modules",
          "method.* keys"]),
        (["--benchmark", "nope"], ["unknown benchmark 'nope'", "choose one of"]),
        (["--strategy", "nope"], ["unknown strategy 'nope'", "choose one of"]),
    ],
)
def test_invalid_configs_fail_before_training(tiny, tmp_path, capsys, monkeypatch, extra,
                                              expected):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "run_stream", no_training)
    assert cli.main([*tiny_flags(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert "Traceback" not in err


def test_benchmark_option_values_of_the_wrong_type_are_refused(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "run_stream", no_training)
    argv = ["run", "--benchmark", "split-cifar100-10", "--strategy", "sulora", "--device", "cpu",
            "--out", str(tmp_path), "--set", "data.augment=flase", "data.limit_per_class=2.5"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.augment: Input should be a valid boolean, not 'flase'" in err, err
    assert "data.limit_per_class: Input should be a valid integer" in err, err
    assert "Traceback" not in err
    # the Python API refuses them too, before any file is read
    with pytest.raises(TypeError, match="augment: Input should be a valid boolean, not 'no'"):
        build_benchmark("split-cifar100-10", data_root=tmp_path / "nowhere", augment="no")


def test_missing_data_is_reported_cleanly(tmp_path, capsys):
    flags = tiny_flags(tmp_path)
    flags[flags.index("tiny-images")] = "pacs-dil"
    assert cli.main([*flags, "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "pacs-64 data not found" in err and "--data-root" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- non-finite loss
class PoisonExperience1(SupervisedPlugin):
    def after_forward(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            strategy.mb_output = strategy.mb_output * float("nan")


def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(tiny, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(cli, "run", functools.partial(loop.run,
                                                      plugins=[PoisonExperience1()]))
    assert cli.main(tiny_flags(tmp_path)) == 4
    err = capsys.readouterr().err
    assert "error: training diverged at experience 2/3, epoch 0, iteration 0: the loss is nan" \
        in err
    assert "--resume and a lower --lr" in err and "Traceback" not in err
    assert [p.name for p in checkpoints(tmp_path / "ckpt")] == ["exp-0000"]
    assert latest_checkpoint(tmp_path / "ckpt").position == 0  # checksums verified
    # the advice is followable: the last good checkpoint resumes at a lower learning rate
    monkeypatch.setattr(cli, "run", loop.run)
    assert cli.main([*tiny_flags(tmp_path), "--resume", "--lr", "1e-4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = record(tmp_path, "sulora")
    assert len(saved["accuracy_matrix"]) == 3 and saved["config"]["training"]["lr"] == 1e-4


# --------------------------------------------------------------------------- exact round trips
class Net(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x)


@settings(max_examples=20, deadline=None)
@given(
    d_in=st.integers(4, 20),
    d_out=st.integers(2, 10),
    rank=st.integers(1, 3),
    slots=st.integers(1, 4),
    ops=st.lists(st.tuples(st.sampled_from(["add", "fuse"]), st.integers(0, 99)), max_size=8),
    open_slot=st.booleans(),
)
def test_save_load_round_trips_exactly(d_in, d_out, rank, slots, ops, open_slot):
    d_in = max(d_in, rank * slots)
    config = SubspaceLoRAConfig(target_modules=["fc"], rank=rank, num_slots=slots)

    def fresh() -> Net:
        torch.manual_seed(0)
        return Net(d_in, d_out)

    model = add_subspace_lora(fresh(), config)
    layer = subspace_lora_layers(model)["fc"]
    owner = 0
    for op, pick in ops:
        if op == "add" and len(layer.slots.free_rows()) >= rank:
            fill_slot(layer, owner, pick)
            owner += 1
        elif op == "fuse" and layer.slots.frozen_rows():
            frozen = layer.slots.frozen_rows()
            layer.fuse(frozen[: 1 + pick % len(frozen)])
    if open_slot and len(layer.slots.free_rows()) >= rank:
        used = layer.lora_A[layer.slots.used_rows()]
        layer.start_slot(owner, directions_outside(torch.randn(8, d_in), used, rank))
    x = torch.randn(3, d_in)
    with tempfile.TemporaryDirectory() as tmp:
        save_subspace_lora(model, tmp)
        loaded = load_subspace_lora(fresh(), tmp)
        assert torch.equal(loaded(x), model(x))
        a, b = adapter_state(model), adapter_state(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        strategy = SimpleNamespace(model=model, plugins=[], clock=SimpleNamespace(),
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        save_checkpoint(tmp, position=0, strategy=strategy, extra={})
        restored = add_subspace_lora(fresh(), config)
        restored.load_state_dict(latest_checkpoint(tmp).model_state, strict=True)
        assert torch.equal(restored(x), model(x))
        a, b = model.state_dict(), restored.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ runs side by side
SIDE_BY_SIDE = """
import os, sys
# the real package (the checkout's, or the installed one), not the slow run in this folder
sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p not in ("", os.getcwd())]
from pathlib import Path
from cl_sulora.runner.reproduce import run_processes
folder = Path(sys.argv[2])
run_processes([([str(folder / f"pid{i}")], folder / f"log{i}") for i in range(3)], 2,
              lambda index, status, seconds: None)
"""


def test_runs_side_by_side_stop_when_their_driver_is_terminated(tmp_path):
    (tmp_path / "cl_sulora").mkdir()
    (tmp_path / "cl_sulora" / "__init__.py").touch()  # a package, found before the real one
    (tmp_path / "cl_sulora" / "__main__.py").write_text(SLOW_RUN)
    driver = subprocess.Popen([sys.executable, "-c", SIDE_BY_SIDE, str(ROOT), str(tmp_path)],
                              cwd=tmp_path)  # `-m cl_sulora` finds the slow run there first
    pids = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pids):
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in (int(p.read_text()) for p in pids):
        with pytest.raises(ProcessLookupError):  # stopped and waited for: not even a zombie
            os.kill(pid, 0)
    assert not (tmp_path / "pid2").exists()  # the third run never started
