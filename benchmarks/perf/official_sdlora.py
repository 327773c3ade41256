"""The first experiences of split CIFAR-100 at the field's scale (ViT-B/16, 224 px, randomly
initialised), this library's SD-LoRA, SuLoRA and InfLoRA against the official SD-LoRA code's
own loop, side by side in one call: wall time of each experience end to end, training images
per second, and where the time goes.

    python -m benchmarks.perf.official_sdlora --official DIR --data-root DATA \
        --out benchmarks/perf/results/official_sdlora [--device cuda] [--epochs 1] \
        [--experiences 2] [--batch-size 128] [--workers 8] \
        [--runs official:fp32,sulora:fp32,sulora:fp32:compile] [--set KEY=VALUE ...]

``--official`` is a checkout of github.com/WuYichen-97/SD-Lora-CL, kept outside this library.
Its code runs unchanged, driven as its ``trainer.py`` drives it (``incremental_train``,
``eval_task``, ``after_task`` for each task) with the settings of ``exps/sdlora_c100.json``
(epochs and batch size from the flags). Substituted from outside: ``timm.create_model`` builds
the model with random weights (no hub download); ``./data``, where its CIFAR-100 loader looks,
is a link to ``--data-root`` in a scratch working folder, read without torchvision's checksums
of the published archive (this library's parties skip theirs too, so a copy holding only the
timed experiences' classes in full serves both); ``torch.load`` keeps the default of the torch
it was written for (``weights_only=False``: it re-loads whole modules it saved itself); its
data loaders get ``--workers`` processes (its own ``num_workers``, 8, by default). This
library's methods run the ``paper/cifar100-10`` recipe's settings (the same class order, batch
and float32), randomly initialised likewise, with the same number of loader processes; a run named
``PARTY:PRECISION:compile`` sets the runner's ``compile`` (``torch.compile`` of the backbone),
whose compilation falls in the first training steps of each experience that needs one: for such
runs each epoch's images per second is recorded too (the last epoch: the rate once compiled,
what a recipe's 20 epochs per experience mostly see). ``--set`` gives this library's parties
more config values (recorded in the settings), to time a setting against the official loop.

Precisions: ``fp32`` (float32, torch's defaults: matrix products in full float32), ``tf32``
(float32 tensors, matrix products and convolutions on TF32 tensor cores; for the official loop
the process turns torch's two backend switches on before its code runs, which changes nothing
in that code) and ``bf16`` (this library's autocast; the official loop has none). Each party is
compared with the official loop at its own precision when that was run, else with ``fp32``.

Every party runs in its own process, one after the other. For each experience: the wall time
from the start of its training to the end of its evaluation on the seen classes' test images
(what the official loop evaluates after a task; the runner of this library evaluates the whole
test stream), split into the training loop (data loading, forward, backward, optimizer), the
evaluation, and the rest (model and optimizer set-up, the methods' boundary work, the official
loop's saving and re-loading of adapters). The official loop also evaluates the test images
inside its training loop (at its epochs 0, 5, 10, ...): that time is counted as evaluation, not
as training. ``--depth`` (fewer transformer blocks) and ``--limit-per-class`` make the CPU
smoke test of the harness small; a timing run uses neither.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .results import environment, resolve_commit, write_json
from .timing import synchronize

PARTIES = ("official", "sdlora", "sulora", "inflora")
PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT_RUNS = "official:fp32,sdlora:fp32,sulora:fp32,inflora:fp32,sdlora:bf16,sulora:bf16"
RECIPE = "paper/cifar100-10"
OFFICIAL_CONFIG = "exps/sdlora_c100.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.official_sdlora",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True,
                        help="a checkout of github.com/WuYichen-97/SD-Lora-CL")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="the folder holding cifar-100-python/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")
    parser.add_argument("--experiences", type=int, default=2, help="experiences timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8, help="data-loader processes")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="PARTY:PRECISION[:compile],... in order; parties: "
                        + ", ".join(PARTIES) + "; PRECISION: fp32, tf32 or bf16 (official: fp32 or "
                        "tf32, never compiled)")
    parser.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config values for this library's parties (as the CLI's --set)")
    parser.add_argument("--depth", type=int, help="smoke test: transformer blocks (default 12)")
    parser.add_argument("--limit-per-class", type=int,
                        help="smoke test: images per class, training and test")
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = parse_runs(args.runs)
    if not (args.official / OFFICIAL_CONFIG).is_file():
        parser.error(f"--official {args.official}: no {OFFICIAL_CONFIG} there; give a checkout "
                     "of github.com/WuYichen-97/SD-Lora-CL")
    if not (args.data_root / "cifar-100-python").is_dir():
        parser.error(f"--data-root {args.data_root}: no cifar-100-python/ folder there")
    args.runs = runs
    return args


def parse_runs(text: str) -> list[tuple[str, str, bool]]:
    """``PARTY:PRECISION[:compile],...`` as (party, precision, compiled) triples."""
    runs = []
    for item in text.split(","):
        party, _, rest = item.partition(":")
        precision, _, mode = rest.partition(":")
        precision = precision or "fp32"
        if party not in PARTIES or precision not in PRECISIONS or mode not in ("", "compile"):
            raise SystemExit(f"--runs: {item!r} is not PARTY:PRECISION[:compile] with PARTY one "
                             f"of {', '.join(PARTIES)} and PRECISION one of "
                             f"{', '.join(PRECISIONS)}")
        if party == "official" and (precision == "bf16" or mode):
            raise SystemExit("--runs: the official loop trains in float32 only, as written "
                             "(official:fp32, or official:tf32 with TF32 matrix products)")
        runs.append((party, precision, mode == "compile"))
    return runs


def run_key(party: str, precision: str, compiled: bool) -> str:
    """The name of a run in the ratios and the file names: ``party:precision[:compile]``."""
    return f"{party}:{precision}" + (":compile" if compiled else "")


class Buckets:
    """Seconds spent in named parts of the current experience; nested parts are subtracted
    from the part they run inside (an evaluation inside a training loop is evaluation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        entry = [name, time.perf_counter(), 0.0]  # name, start, time of nested parts
        self._stack.append(entry)
        try:
            yield
        finally:
            synchronize(self.device)
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.seconds[name] += elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` as part ``name``."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def experience_record(index: int, wall: float, parts: dict[str, float], train_images: int,
                      eval_images: int) -> dict[str, Any]:
    train = parts.get("train", 0.0)
    evaluation = parts.get("eval", 0.0)
    return {"experience": index + 1, "wall_s": wall, "train_s": train, "eval_s": evaluation,
            "other_s": wall - train - evaluation, "train_images": train_images,
            "eval_images": eval_images,
            "train_images_per_s": train_images / train if train else None,
            "end_to_end_images_per_s": train_images / wall}


# --- the official loop ---------------------------------------------------------------------

def run_official(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    import numpy as np
    import timm
    import torchvision

    official = args.official.resolve()
    sys.path.insert(0, str(official))
    scratch = Path(tempfile.mkdtemp(prefix="sdlora-official-"))
    (scratch / "data").symlink_to(args.data_root.resolve(), target_is_directory=True)
    os.chdir(scratch)
    create_model = timm.create_model

    @functools.wraps(create_model)
    def random_init(name: str, *model_args: Any, **kwargs: Any) -> torch.nn.Module:
        kwargs["pretrained"] = False
        if args.depth:
            kwargs["depth"] = args.depth
        return create_model(name, *model_args, **kwargs)

    timm.create_model = random_init
    # the local copy need not be the published archive byte for byte: read it as it is
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    # it re-loads the adapters it saved with torch.load's default of its time (torch < 2.6)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    if device.type == "cpu":  # smoke test: its hard-coded .cuda() calls become no-ops
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self

    import models.base as base
    import models.sdlora as sdlora
    import trainer
    import utils.data as data
    from utils import factory
    from utils.data_manager import DataManager

    config = json.loads((official / OFFICIAL_CONFIG).read_text())
    config.update({"init_epoch": args.epochs, "epochs": args.epochs,
                   "batch_size": args.batch_size, "seed": config["seed"][0],
                   "device": [-1] if device.type == "cpu" else [str(device.index or 0)]})
    sdlora.num_workers = args.workers
    if args.limit_per_class:
        download = data.iCIFAR224.download_data

        def limited(self: Any) -> None:
            download(self)
            for split in ("train", "test"):
                targets = getattr(self, f"{split}_targets")
                keep = np.concatenate([np.flatnonzero(targets == c)[:args.limit_per_class]
                                       for c in np.unique(targets)])
                setattr(self, f"{split}_data", getattr(self, f"{split}_data")[keep])
                setattr(self, f"{split}_targets", targets[keep])

        data.iCIFAR224.download_data = limited

    buckets = Buckets(device)
    buckets.wrap(sdlora.Learner, "_init_train", "train")
    buckets.wrap(sdlora.Learner, "_update_representation", "train")
    buckets.wrap(base.BaseLearner, "_compute_accuracy", "eval")
    buckets.wrap(base.BaseLearner, "_eval_cnn", "eval")
    sizes: dict[str, int] = {}
    get_dataset = DataManager.get_dataset

    def counted(self: Any, indices: Any, source: str, mode: str, **kwargs: Any) -> Any:
        dataset = get_dataset(self, indices, source=source, mode=mode, **kwargs)
        sizes[source] = len(dataset)
        return dataset

    DataManager.get_dataset = counted
    (scratch / config["filepath"]).mkdir(parents=True, exist_ok=True)
    trainer._set_random(config["seed"])
    trainer._set_device(config)
    manager = DataManager(config["dataset"], config["shuffle"], config["seed"],
                          config["init_cls"], config["increment"], config)
    config["nb_classes"], config["nb_tasks"] = manager.nb_classes, manager.nb_tasks
    learner = factory.get_model(config["model_name"], config)
    records = []
    for index in range(args.experiences):
        synchronize(device)
        start = time.perf_counter()
        learner.incremental_train(manager)
        learner.eval_task()
        learner.after_task()
        synchronize(device)
        wall = time.perf_counter() - start
        records.append(experience_record(index, wall, buckets.take(),
                                         sizes["train"] * args.epochs, sizes["test"]))
    return records


# --- this library --------------------------------------------------------------------------

def run_library(args: argparse.Namespace, device: torch.device, strategy_name: str,
                precision: str, compiled: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from cl_sulora.runner.build import build_experiment, seed_everything
    from cl_sulora.runner.config import parse_overrides, resolve_config
    from cl_sulora.runner.recipes import load_recipe

    recipe = load_recipe(RECIPE)
    (_, _, overrides), = recipe.runs(seeds=recipe.spec.seeds[:1], strategies=[strategy_name])
    overrides = {**overrides, "backbone.pretrained": False, "device": str(device),
                 "precision": precision, "data.data_root": str(args.data_root),
                 "data.verify_checksums": False,
                 "training.epochs": args.epochs, "training.batch_size": args.batch_size,
                 "training.eval_batch_size": args.batch_size,
                 "training.num_workers": args.workers, "compile": compiled,
                 **parse_overrides(args.sets)}
    if args.depth:
        overrides["backbone.kwargs"] = {"depth": args.depth}
    if args.limit_per_class:
        overrides["data.limit_per_class"] = args.limit_per_class
    config = resolve_config(recipe.spec.benchmark, strategy_name, overrides)
    seed_everything(config.seed, config.deterministic)
    experiment = build_experiment(config)
    seed_everything(config.seed, config.deterministic)
    strategy = experiment.strategy
    stream = experiment.spec.benchmark
    loading = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    buckets = Buckets(device)
    epochs = epoch_timer(strategy, device)
    records = []
    for index in range(args.experiences):
        train_before = experiment.timer.seconds
        synchronize(device)
        start = time.perf_counter()
        strategy.train(stream.train_stream[index], **loading)
        seen = stream.test_stream[: index + 1]
        with buckets.part("eval"):
            strategy.eval(seen, **loading)
        synchronize(device)
        wall = time.perf_counter() - start
        parts = {**buckets.take(), "train": experiment.timer.seconds - train_before}
        train_images = len(stream.train_stream[index].dataset) * args.epochs
        eval_images = sum(len(e.dataset) for e in seen)
        record = experience_record(index, wall, parts, train_images, eval_images)
        record["epoch_images_per_s"] = [train_images / args.epochs / s for s in epochs]
        epochs.clear()
        records.append(record)
    return records, config.model_dump(mode="json")


def epoch_timer(strategy: Any, device: torch.device) -> list[float]:
    """Times each of ``strategy``'s training epochs from now on (the device synchronised at
    both ends) into the list returned."""
    seconds: list[float] = []
    inner = strategy.training_epoch

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return result

    strategy.training_epoch = timed
    return seconds


# --- the parent ----------------------------------------------------------------------------

def child_main(args: argparse.Namespace) -> None:
    (party, precision, compiled), = parse_runs(args.child)
    device = torch.device(args.device)
    if party == "official":
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        records, config = run_official(args, device), None
    else:
        records, config = run_library(args, device, party, precision, compiled)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    write_json(args.child_out, {"party": party, "precision": precision, "compile": compiled,
                                "experiences": records,
                                "peak_memory_mb": peak / 2**20 if peak else None,
                                "config": config})


def run_child(argv: list[str], run: tuple[str, str, bool], out: Path,
              echo: Callable[[str], None]) -> dict[str, Any]:
    key = run_key(*run)
    path = out / f"{key.replace(':', '-')}.json"
    log = path.with_suffix(".log")
    command = [sys.executable, "-m", "benchmarks.perf.official_sdlora", *argv,
               "--child", key, "--child-out", str(path.resolve())]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    echo(f"{key} ...")
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              cwd=root)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{key} failed (exit {done.returncode}); the end of "
                         f"{log}:\n" + "\n".join(tail))
    return json.loads(path.read_text())


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios against the official loop, per experience: training images per second, images
    per second of the whole experience, and the last epoch's training rate against the official
    loop's training rate (for a compiled run: the rate once compiled). Each run is compared with
    the official run of its own precision, or the ``fp32`` one when there is none (``against``
    names it)."""
    officials = {r["precision"]: r for r in results if r["party"] == "official"}
    ratios: dict[str, Any] = {}
    for result in results:
        official = officials.get(result["precision"], officials.get("fp32"))
        if result["party"] == "official" or official is None:
            continue
        key = run_key(result["party"], result["precision"], result.get("compile", False))
        against = run_key("official", official["precision"], False)
        ratios[key] = [
            {"experience": mine["experience"], "against": against,
             "train_images_per_s": (mine["train_images_per_s"] / theirs["train_images_per_s"]
                                    if mine["train_images_per_s"]
                                    and theirs["train_images_per_s"] else None),
             "end_to_end_images_per_s": (mine["end_to_end_images_per_s"]
                                         / theirs["end_to_end_images_per_s"]),
             "last_epoch_images_per_s": (mine["epoch_images_per_s"][-1]
                                         / theirs["train_images_per_s"]
                                         if mine.get("epoch_images_per_s")
                                         and theirs["train_images_per_s"] else None)}
            for mine, theirs in zip(result["experiences"], official["experiences"],
                                    strict=True)]
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device(args.device), resolve_commit(args.commit))  # before the runs
    results = [run_child(argv, run, args.out, lambda s: print(s, flush=True))
               for run in args.runs]
    for result in results:
        rows = ", ".join(f"exp {e['experience']}: {e['wall_s']:.1f} s, train "
                         f"{e['train_images_per_s'] or 0:.0f} img/s"
                         + "".join(f", epoch {i + 1} {v:.0f} img/s"
                                   for i, v in enumerate(e.get("epoch_images_per_s", [])))
                         for e in result["experiences"])
        key = run_key(result["party"], result["precision"], result["compile"])
        print(f"{key:>20}: {rows}", flush=True)
    settings = {"epochs": args.epochs, "experiences": args.experiences,
                "batch_size": args.batch_size, "workers": args.workers,
                "depth": args.depth or 12, "limit_per_class": args.limit_per_class,
                "library_sets": args.sets,
                "image_size": 224, "backbone": "vit_base_patch16_224, random init",
                "benchmark": "split-cifar100-10", "recipe": RECIPE,
                "official_config": OFFICIAL_CONFIG, "command": ["python", "-m",
                                                                "benchmarks.perf.official_sdlora",
                                                                *argv]}
    payload = {"group": "official_sdlora", **env, "settings": settings,
               "ratios_to_official": summarize(results), "runs": results}
    write_json(args.out / "official_sdlora.json", payload)
    return payload


if __name__ == "__main__":
    main()
