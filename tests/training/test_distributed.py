"""Data-parallel runs: two CPU processes (gloo) started the way torchrun starts them, the batch
sharding, and the refusals of what a distributed run does not support."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cl_sulora.errors import ConfigError
from cl_sulora.training import distributed
from tests.helpers import tiny_flags

ROOT = Path(__file__).resolve().parents[2]

#: One rank of ``cl-sulora run`` on the tiny benchmark, with a probe that records, per rank,
#: the training samples of every epoch, the model state after every experience, the evaluated
#: accuracies and every file the run writes; the probe goes to $PROBE/rank<r>.json.
SCRIPT = """
import functools, hashlib, json, os, sys
from pathlib import Path
from avalanche.core import SupervisedPlugin
from cl_sulora.metrics import accuracy_row
from cl_sulora.runner import cli, loop
from cl_sulora.training import distributed
from cl_sulora.benchmarks import BENCHMARKS
from tests.helpers import tiny_images

probe = {"seen": {}, "experience": {}, "digest": [], "agree": [], "rows": [], "writes": []}

def row_hash(x):
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()

class Probe(SupervisedPlugin, supports_distributed=True):
    def after_training_iteration(self, strategy, **kwargs):
        key = f"{strategy.clock.train_exp_counter}/{strategy.clock.train_exp_epochs}"
        probe["seen"].setdefault(key, []).extend(row_hash(x) for x in strategy.mb_x)

    def after_training_exp(self, strategy, **kwargs):
        data = strategy.experience.dataset.train()
        probe["experience"][str(strategy.clock.train_exp_counter)] = sorted(
            row_hash(data[i][0]) for i in range(len(data)))
        probe["digest"].append(distributed.state_digest(strategy.model))
        probe["agree"].append(distributed.replicas_agree(strategy.model))

    def after_eval(self, strategy, **kwargs):
        metrics = strategy.evaluator.get_last_metrics()
        probe["rows"].append(accuracy_row(metrics, 2))

def logged(function, what):
    def write(*args, **kwargs):
        probe["writes"].append(what)
        return function(*args, **kwargs)
    return write

loop.write_record = logged(loop.write_record, "results")
loop.save_checkpoint = logged(loop.save_checkpoint, "checkpoint")
BENCHMARKS["tiny-images"] = tiny_images
cli.run = functools.partial(loop.run, plugins=[Probe()])
status = cli.main(sys.argv[1:])
Path(os.environ["PROBE"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(probe))
sys.exit(status)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], probe: Path, world: int = 2,
           script: str = SCRIPT) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks of ``script`` with torchrun's environment; wait for all of them."""
    probe.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "PROBE": str(probe), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", script, *argv], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


#: Each rank holds flags; every rank must read each flag as set when any rank set it.
FLAGS = """
import os, torch, torch.distributed as dist
from cl_sulora.training import distributed
dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
for mine in ([[False, True], [False, False]][rank], [[True, True], [True, False]][rank],
             [False, False]):
    print(distributed.any_over_ranks(torch.tensor(mine)))
dist.destroy_process_group()
"""


def test_ranks_agree_on_the_divergence_flags(tmp_path):
    for process in launch([], tmp_path, script=FLAGS):
        assert process.returncode == 0, process.stderr[-2000:]
        assert process.stdout.split("\n")[:3] == ["[False, True]", "[True, True]",
                                                  "[False, False]"]


@pytest.mark.parametrize("strategy, extra", [
    ("sulora", ["--set", "method.allocator=data", "method.recompose_every=2",
                "method.slot_magnitudes=true"]),
    ("sdlora", ["--set", "alignment.enabled=true", "training.num_workers=1"]),
])
def test_two_gloo_ranks_keep_identical_adapters_and_shard_the_data(strategy, extra, tmp_path):
    argv = [*tiny_flags(tmp_path, strategy), "--num-experiences", "2", "--epochs", "2",
            "--batch-size", "4", *extra]
    ranks = launch(argv, tmp_path / "probe")
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, f"rank {rank}:\n{process.stderr[-3000:]}"
    probes = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]

    # identical adapters (every parameter and buffer) after each experience, checked in-run too
    assert len(probes[0]["digest"]) == 2
    assert probes[0]["digest"] == probes[1]["digest"]
    assert probes[0]["agree"] == probes[1]["agree"] == [True, True]

    # every epoch: disjoint shards that together cover the experience exactly once
    assert sorted(probes[0]["seen"]) == ["0/0", "0/1", "1/0", "1/1"]
    for key, first in probes[0]["seen"].items():
        second = probes[1]["seen"][key]
        assert len(first) == len(second) == len(set(first)) == len(set(second))
        assert not set(first) & set(second)
        assert sorted(first + second) == probes[0]["experience"][key.split("/")[0]]
    assert probes[0]["seen"]["0/0"] != probes[0]["seen"]["0/1"]  # reshuffled per epoch

    # every rank evaluates the whole stream: the same accuracies
    assert probes[0]["rows"] == probes[1]["rows"]
    assert len(probes[0]["rows"]) == 2

    # only rank 0 writes: results once, a checkpoint per experience; rank 1 prints nothing
    assert probes[0]["writes"] == ["checkpoint", "checkpoint", "results"]
    assert probes[1]["writes"] == []
    assert ranks[1].stdout == ""
    results = list((tmp_path / "results").glob("*.json"))
    assert [p.name for p in results] == [f"tiny-images__{strategy}__seed0.json"]
    assert len(list((tmp_path / "results").glob("*__compare.md"))) == 1
    record = json.loads(results[0].read_text())
    assert record["world_size"] == 2
    assert record["config"]["training"]["batch_size"] == 4
    matrix = record["accuracy_matrix"]
    assert matrix == probes[0]["rows"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)


def test_replay_and_indivisible_batches_are_refused(monkeypatch):
    from cl_sulora.benchmarks import BENCHMARKS
    from cl_sulora.runner.config import resolve_config
    from cl_sulora.runner.loop import check_distributed
    from tests.helpers import tiny_images

    monkeypatch.setitem(BENCHMARKS, "tiny-images", tiny_images)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="cannot run under torchrun"):
        check_distributed(resolve_config("tiny-images", "replay", {"device": "cpu"}))
    with pytest.raises(ConfigError, match="divisible by the 2 ranks"):
        check_distributed(resolve_config("tiny-images", "sulora",
                                         {"device": "cpu", "training.batch_size": 7}))
    check_distributed(resolve_config("tiny-images", "sulora", {"device": "cpu"}))


# ----------------------------------------------------------------------------- batch sharding
@pytest.mark.parametrize("n, batch, world", [(12, 4, 2), (13, 4, 2), (9, 4, 2), (10, 6, 3),
                                             (7, 6, 4), (5, 8, 4), (2, 4, 2)])
def test_sharded_batches_cover_each_sample_once_with_equal_iteration_counts(n, batch, world):
    samplers = [distributed.ShardedBatchSampler(n, batch, rank=r, world=world, seed=3)
                for r in range(world)]
    for _epoch in range(2):
        batches = [list(s) for s in samplers]
        assert len({len(b) for b in batches}) == 1  # the same number of iterations everywhere
        assert all(len(b) == len(samplers[0]) for b in batches)
        seen = [i for rank_batches in batches for b in rank_batches for i in b]
        assert sorted(seen) == list(range(n))
        for step, size in enumerate(samplers[0].global_sizes):
            shards = [len(b[step]) for b in batches]
            assert sum(shards) == size and min(shards) >= 1 and max(shards) - min(shards) <= 1
    full = -(-n // batch)
    last = n - (full - 1) * batch
    assert len(samplers[0]) == (full - 1 if full > 1 and last < world else full)


def test_environment_detection(monkeypatch):
    assert distributed.launch_from_env({}) is None
    assert distributed.launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    launch = distributed.launch_from_env(
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (
        3, 1, 4, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        distributed.launch_from_env({"WORLD_SIZE": "2", "RANK": "0"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert str(distributed.local_device("cuda")) == "cuda:1"
    assert str(distributed.local_device("cpu")) == "cpu"
    with pytest.raises(ConfigError, match="use --device cuda"):
        distributed.local_device("cuda:0")
    assert distributed.rank() == 1 and not distributed.is_main()


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        with distributed.process_group("cuda"):
            pass


def test_two_gloo_ranks_resume_from_a_checkpoint_as_if_never_stopped(tmp_path):
    argv = [*tiny_flags(tmp_path, "sulora"), "--batch-size", "4"]
    for rank, process in enumerate(launch(argv, tmp_path / "whole")):
        assert process.returncode == 0, f"rank {rank}:\n{process.stderr[-3000:]}"
    whole = json.loads((tmp_path / "whole" / "rank0.json").read_text())
    record = json.loads((tmp_path / "results" / "tiny-images__sulora__seed0.json").read_text())

    # drop the newest checkpoint (experience 3 of 3) and resume from the one before
    checkpoints = sorted((tmp_path / "ckpt").iterdir())
    for f in checkpoints[-1].iterdir():
        f.unlink()
    checkpoints[-1].rmdir()
    resumed_ranks = launch([*argv, "--resume"], tmp_path / "resumed")
    for rank, process in enumerate(resumed_ranks):
        assert process.returncode == 0, f"rank {rank}:\n{process.stderr[-3000:]}"
    probes = [json.loads((tmp_path / "resumed" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert probes[0]["digest"] == probes[1]["digest"] == whole["digest"][-1:]
    again = json.loads((tmp_path / "results" / "tiny-images__sulora__seed0.json").read_text())
    assert again["accuracy_matrix"] == record["accuracy_matrix"]
