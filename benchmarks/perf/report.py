"""Write ``benchmarks/PERFORMANCE.md`` and its figures from a suite run, and publish its headline
ratios as ``benchmarks/perf/summary.json``:
``python -m benchmarks.perf.report DIR [--output PATH] [--plots DIR] [--summary PATH]``.

Every number in the report is read from the run's JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from cl_sulora.metrics import a_last

from .official_sdlora import run_key
from .plots import LABELS, MIB, memory_plot, step_time_plot
from .results import ROOT, SUMMARY, read_groups
from .summary import boundary_fractions, build_summary, eval_ms, train_ms

Groups = dict[str, dict[str, Any]]
GIB = 2**30
DEFAULT_OUTPUT = ROOT / "benchmarks" / "PERFORMANCE.md"
DEFAULT_PLOTS = ROOT / "benchmarks" / "perf" / "plots"
DEFAULT_SUMMARY = ROOT / "benchmarks" / "perf" / "summary.json"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.4g}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.3f}x"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _records(groups: Groups, group: str) -> list[dict[str, Any]]:
    return groups[group]["results"]["records"] if group in groups else []


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _continual(records: list[dict[str, Any]]) -> list[str]:
    """Methods measured per experience, in the order measured."""
    return list(dict.fromkeys(r["method"] for r in records if r["experience"] is not None))


def _experiences(records: list[dict[str, Any]]) -> list[int]:
    return sorted({r["experience"] for r in records if r["experience"] is not None})


def _pick(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def _meta(groups: Groups) -> dict[str, Any]:
    return next(iter(groups.values()))


# ------------------------------------------------------------------------------ header, targets
def header(by_backbone: dict[str, Groups]) -> list[str]:
    lines = ["# Performance", "",
             "Measured by `python -m benchmarks.perf.suite` and written by "
             "`python -m benchmarks.perf.report`: every number below is read from the run's "
             "JSON files.", ""]
    rows, tiny = [], False
    for key, groups in by_backbone.items():
        meta = _meta(groups)
        suite, spec = meta["settings"]["suite"], meta["settings"]["backbone"]
        tiny = tiny or suite["tiny"]
        rows.append([key, f"`{spec['timm_name']}` {spec['kwargs']}", meta["device"],
                     meta["torch"], f"`{meta['commit']}`", meta["created"],
                     str(spec["batch_size"]), suite["precision"],
                     f"median of {suite['iters']} calls after {suite['warmup']}"])
    lines += _table(["Backbone", "Model (random weights)", "Device", "torch", "Commit",
                     "Measured", "Batch", "Autocast", "Timing"], rows)
    suite = _meta(next(iter(by_backbone.values())))["settings"]["suite"]
    lines += [f"Every method has rank {suite['rank']} per experience on q and v of every "
              f"block's fused qkv (PEFT's LoRA: rank {suite['rank']} on the whole qkv); SuLoRA "
              f"has {suite['num_slots']} slots and fuses when full. Each method trains with "
              "AdamW over exactly its trainable parameters at that experience plus a linear "
              f"head of {suite['num_classes']} classes. Experience k is the state after k - 1 "
              "finished experiences with the k-th in training, built through the methods' "
              "plugins with random values in place of training (InfLoRA: random orthonormal "
              "A in place of its data-designed one).", ""]
    if tiny:
        lines += ["**Tiny CPU check run (`--tiny`): tiny ViTs, few iterations. These numbers "
                  "check the suite; they do not measure the targets.**", ""]
    return lines


def targets(summary: dict[str, dict[str, Any]], backbones: list[str]) -> list[str]:
    rows = []
    for key, entry in summary.items():
        by = entry.get("by_backbone", {})
        verdict = {True: "pass", False: "**fail**", None: "n/a"}[entry["pass"]]
        rows.append([f"`{key}`", _num(entry["value"], 4), _num(entry["target"]), verdict,
                     *[_num(by.get(b), 4) for b in backbones], entry.get("note", "")])
    return ["## Targets", "",
            "Value: the worst (largest) over the measured backbones; all targets are upper "
            "bounds but `ddp_2gpu_speedup`'s, a lower bound (the DDP entries come from "
            "`python -m benchmarks.perf.ddp`).", "",
            *_table(["Key", "Value", "Target", "Result", *backbones, "What"], rows)]


# -------------------------------------------------------------------------------------- training
def training(key: str, groups: Groups, plot: Path | None, output_dir: Path) -> list[str]:
    floor = groups["floor"]["results"]
    train = _records(groups, "train_step")
    ref = groups["floor"]["settings"]["suite"]["reference_experience"]
    matmul = floor["matmul"]
    flops = floor["flops"]
    lines = ["### Training step", "",
             f"Floor: {_tflop(flops['forward_backward_frozen'])} TFLOP per step (the "
             "backbone's forward and backward with frozen weights, i.e. activation gradients "
             f"only; {_tflop(flops['forward_backward_full'])} TFLOP with weight gradients) "
             f"at the measured bf16 matmul rate of {matmul['tflops']:.4g} TFLOP/s "
             f"({matmul['size']}-cubed matmul) = **{floor['floor_ms']:.2f} ms** "
             f"({floor['floor_full_ms']:.2f} ms with weight gradients).", ""]
    peft = train_ms(groups, "peft_lora", None)
    rows = []
    for method, name in (("backbone", "bare backbone (frozen, backward to the input)"),
                         ("peft_lora", "PEFT LoRA (whole qkv)")):
        record = _pick(train, method=method, compiled=False)
        if record:
            rows.append([name, _num(record["median_ms"]),
                         _ratio(record["median_ms"], floor["floor_ms"]),
                         f"{record['trainable_params']:,}", _tflop(record["flops"])])
    lines += _table(["Reference", "ms", "/ floor", "trainable params", "TFLOP"], rows)
    experiences = _experiences(train)
    rows = []
    for method in _continual(train):
        times = [train_ms(groups, method, e) for e in experiences]
        at_ref = train_ms(groups, method, ref)
        record = _pick(train, method=method, experience=ref, compiled=False) or {}
        rows.append([_label(method), *[_num(t) for t in times], _ratio(at_ref, peft),
                     _ratio(at_ref, floor["floor_ms"]),
                     f"{record.get('trainable_params', 0):,}",
                     _tflop(record.get("flops", 0))])
    lines += _table(["Method (ms at experience)", *[str(e) for e in experiences],
                     f"{ref} / PEFT", f"{ref} / floor", f"trainable params at {ref}",
                     f"TFLOP at {ref}"], rows)
    lines += [groups["train_step"]["results"]["note"], ""]
    lines += compiled(groups)
    if plot:
        lines += [f"![Training step time against experience, {key}]"
                  f"({os.path.relpath(plot, output_dir)})", ""]
    return lines


def compiled(groups: Groups) -> list[str]:
    """Eager against ``torch.compile``d backbones, where the run measured both."""
    rows = []
    for group, field in (("train_step", None), ("inference", "mode")):
        for record in _records(groups, group):
            if not record["compiled"]:
                continue
            match = {k: record[k] for k in ("method", "experience", field) if k}
            eager = _pick(_records(groups, group), compiled=False, **match)
            dynamo = record["dynamo"]
            rows.append([_label(record["method"]), str(record["experience"] or "-"),
                         "train" if field is None else f"inference, {record['mode']}",
                         _num(eager and eager["median_ms"]), _num(record["median_ms"]),
                         _ratio(record["median_ms"], eager and eager["median_ms"]),
                         f"{dynamo['graphs']} / {dynamo['graph_breaks']}"])
    if not rows:
        return []
    return ["`torch.compile` of the backbone (compilation happens in the warm-up calls; graphs "
            "compiled beyond a few mean recompilation in the timed calls):", "",
            *_table(["Method", "Experience", "Call", "eager ms", "compiled ms",
                     "compiled / eager", "graphs / graph breaks"], rows)]


# ------------------------------------------------------------------------------------- inference
def inference(groups: Groups) -> list[str]:
    records = [r for r in _records(groups, "inference") if not r["compiled"]]
    bare = eval_ms(groups, "backbone", None, "bare")
    rows = [["bare backbone", "-", _num(bare), "-", "1.000x", "-", "0"]]
    peft_rows = [("peft_lora", None)]
    continual = [(m, e) for m in _continual(records) for e in _experiences(records)]
    for method, experience in peft_rows + continual:
        unmerged = eval_ms(groups, method, experience, "unmerged")
        merged = eval_ms(groups, method, experience, "merged")
        record = _pick(records, method=method, experience=experience) or {}
        rows.append([_label(method), str(experience or "-"), _num(unmerged), _num(merged),
                     _ratio(unmerged, bare), _ratio(merged, bare),
                     f"{record.get('live_adapter_values', 0):,}"])
    return ["### Inference forward", "",
            "After experience k has finished (SuLoRA: min(k, slots) live slots).", "",
            *_table(["Method", "After experience", "unmerged ms", "merged ms",
                     "unmerged / backbone", "merged / backbone", "live adapter values"],
                    rows)]


# ---------------------------------------------------------------------------------------- memory
def _total(record: dict[str, Any]) -> int:
    """Adapter tensors plus their optimizer state."""
    return record["adapter_bytes"] + record["optimizer_state_bytes"]


def memory(key: str, groups: Groups, plot: Path | None, output_dir: Path) -> list[str]:
    records = _records(groups, "memory")
    rows = []
    for record in records:
        if record["method"] == "backbone":
            continue
        total = _total(record)
        peak = record["peak_gpu_bytes"]
        rows.append([_label(record["method"]), str(record["experience"] or "-"),
                     _num(record["adapter_bytes"] / MIB, 3),
                     _num(record["optimizer_state_bytes"] / MIB, 3), _num(total / MIB, 3),
                     f"{record['live_adapter_values']:,}", f"{record['trainable_params']:,}",
                     _num(peak and peak / GIB)])
    lines = ["### Adapter memory", "",
             "While training experience k: the adapter layers' parameters and buffers (their "
             "wrapped weights excluded; SuLoRA preallocates all its slots) and the optimizer "
             "state of the adapter parameters; peak GPU memory of the training steps.", "",
             *_table(["Method", "Experience", "adapter MiB", "optimizer state MiB", "total MiB",
                      "live adapter values", "trainable params", "peak GPU GiB"], rows)]
    ref = groups["memory"]["settings"]["suite"]["reference_experience"]
    last = max(_experiences(records), default=ref)
    ratios = []
    for method in _continual(records):
        at_last = _pick(records, method=method, experience=last)
        at_ref = _pick(records, method=method, experience=ref)
        if at_last and at_ref:
            ratios.append(f"{_label(method)} {_ratio(_total(at_last), _total(at_ref))}")
    lines += [f"Total at experience {last} / at {ref}: " + ", ".join(ratios) + ".", ""]
    if plot:
        lines += [f"![Adapter memory against experience, {key}]"
                  f"({os.path.relpath(plot, output_dir)})", ""]
    return lines


# -------------------------------------------------------------------------------------- boundary
def boundary(groups: Groups) -> list[str]:
    if "boundary" not in groups:
        return []
    results = groups["boundary"]["results"]
    fractions = boundary_fractions(groups)
    rows = []
    for allocator, fraction in fractions.items():
        mine = [r for r in results["records"] if r["allocator"] == allocator]
        fusing = [r for r in mine if r["fused_pairs"] > 0]

        def median(records: list[dict[str, Any]], field: str) -> float | None:
            return statistics.median(r[field] for r in records) if records else None

        rows.append([allocator, str(len(mine)), str(len(fusing)),
                     _num(median(mine, "total_ms")), _num(median(fusing, "total_ms")),
                     _num(median(fusing, "end_ms")), _num(median(fusing, "start_ms")),
                     _num(median(fusing, "record_ms")), _num(median(fusing, "point_ms")),
                     f"{fraction:.2%}"])
    return ["### Experience boundary (SuLoRA)", "",
            "The plugin's work between two experiences: `after_training_exp` (end the slot; "
            "`data`: grow the input basis from the experience's recorded covariance) then "
            "`before_training_exp` (fuse when full, allocate, freeze, rebuild the optimizer; "
            "`data`: the slot starts with zero rows); for `data` also its work inside the "
            "first `ceil(data_max_samples / batch)` training batches of the new experience: "
            "recording their layer inputs' covariance (record: those forward passes with the "
            "recorder, less the same passes without) and then setting the slot's rows (point). "
            "An experience's training time: "
            f"{results['steps_per_experience']} steps x {results['step_ms']:.2f} ms "
            f"({results['step_source']}) = {results['experience_train_ms'] / 1e3:.2f} s"
            + (f"; {results['experience_train_basis']}." if "experience_train_basis" in results
               else "."), "",
            *_table(["Allocator", "boundaries", "fusing", "median ms (all)",
                     "median ms (fusing)", "end ms (fusing)", "start ms (fusing)",
                     "record ms (fusing)", "point ms (fusing)", "fusing / experience"], rows),
            *sample_sweep(results)]


def sample_sweep(results: dict[str, Any]) -> list[str]:
    """The ``data`` allocator's boundary time against ``data_max_samples``."""
    sweep = results.get("data_sample_sweep")
    if not sweep:
        return []
    rows = [[f"{r['data_max_samples']:,}" + (" (all)" if r["all_of_experience"] else ""),
             str(r["batches"]), str(r["boundaries"]), _num(r["median_end_ms"]),
             _num(r["median_start_ms"]), _num(r["median_record_ms"]),
             _num(r["median_point_ms"]), _num(r["median_total_ms"]),
             f"{r['median_total_ms'] / results['experience_train_ms']:.2%}"] for r in sweep]
    return ["`data` allocator against `data_max_samples` (inputs per covariance estimate, "
            "taken as whole training batches; boundaries that do not fuse):", "",
            *_table(["data_max_samples", "batches", "boundaries", "median end ms",
                     "median start ms", "median record ms", "median point ms",
                     "median total ms", "total / experience"], rows)]


# --------------------------------------------------------------------------------------- profile
def _idle(step: float | None, busy: float, clock: str) -> str:
    if step is None or busy > step:
        return (f"the profiled steps ran longer than the timed median ({_num(step)} ms): the "
                "profiler's own overhead, so no idle time can be read from them.")
    return (f"the remaining {_num(step - busy)} ms the {clock} waits (kernel launches, Python "
            "and host work between kernels).")


def profile(groups: Groups) -> list[str]:
    prof = groups.get("profile", {}).get("results") or {}
    if not prof:
        return []
    step = train_ms(groups, prof["method"], prof["experience"])
    floor = groups["floor"]["results"]
    clock = prof["clock"]
    busy = prof["busy_ms_per_step"]
    record = _pick(_records(groups, "train_step"), method=prof["method"],
                   experience=prof["experience"], compiled=False) or {}
    matmul_ms = prof["categories"].get("matmul")
    lines = [f"### Where the step time goes ({_label(prof['method'])}, experience "
             f"{prof['experience']}, PyTorch profiler over {prof['steps']} steps)", "",
             f"Step {_num(step)} ms against a floor of {_num(floor['floor_ms'])} ms "
             f"({_ratio(step, floor['floor_ms'])}). The operators keep the {clock} busy "
             f"{_num(busy)} ms per step; " + _idle(step, busy, clock)]
    if matmul_ms and record.get("flops"):
        rate = record["flops"] / (matmul_ms * 1e-3) / 1e12
        lines[-1] += (f" Matmul-class operators take {_num(matmul_ms)} ms for the step's "
                      f"{_tflop(record['flops'])} TFLOP counted: {rate:.4g} TFLOP/s against "
                      f"the {floor['matmul']['tflops']:.4g} TFLOP/s of the large matmul; the "
                      f"other {_num(busy - matmul_ms)} ms go to the operators below.")
    lines.append("")
    rows = [[cat, _num(ms, 3), _share(ms, busy)] for cat, ms in prof["categories"].items()]
    lines += _table(["Category", f"{clock} ms per step", "share of busy"], rows)
    rows = [[f"`{op['name']}`", op["category"], _num(op["calls_per_step"], 1),
             _num(op["ms_per_step"], 3), _share(op["ms_per_step"], busy)]
            for op in prof["top_ops"]]
    return lines + _table(["Top operator", "category", "calls per step", f"{clock} ms per step",
                           "share"], rows)


# ---------------------------------------------------------------------------------------- report
def backbone_section(key: str, groups: Groups, plots: Path, output_dir: Path) -> list[str]:
    spec = _meta(groups)["settings"]["backbone"]
    step_plot = mem_plot = None
    if "train_step" in groups and "floor" in groups:
        step_plot = step_time_plot(_records(groups, "train_step"),
                                   groups["floor"]["results"]["floor_ms"],
                                   f"{key}: training step", plots / f"step_time_{key}.png")
    if "memory" in groups:
        mem_plot = memory_plot(groups["memory"]["results"]["curve"],
                               _records(groups, "memory"), f"{key}: adapter memory",
                               plots / f"adapter_memory_{key}.png")
    lines = [f"## {key}: `{spec['timm_name']}` {spec['kwargs']}, batch {spec['batch_size']}",
             ""]
    if "train_step" in groups and "floor" in groups:
        lines += training(key, groups, step_plot, output_dir)
    if "inference" in groups:
        lines += inference(groups)
    if "memory" in groups:
        lines += memory(key, groups, mem_plot, output_dir)
    return lines + boundary(groups) + profile(groups)


def _optional_json(path: Path) -> dict[str, Any] | None:
    """The JSON at ``path``, or None when that run was not made."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def long_stream(directory: Path, output_dir: Path) -> list[str]:
    """The 100-experience run of ``benchmarks.perf.long_stream`` (``long_stream/``), if any."""
    path = directory / "long_stream" / "long_stream.json"
    run = _optional_json(path)
    if run is None:
        return []
    cfg, records = run["settings"], run["results"]["records"]
    data = "generated images, random-weight ViT" if cfg["synthetic"] else "split-cifar100-100"
    lines = ["## Long stream: 100 experiences end to end", "",
             f"`python -m benchmarks.perf.long_stream` on {run['device']}, commit "
             f"`{run['commit']}`: {cfg['experiences']} experiences of {data} "
             f"(size {cfg['size']}), {cfg['samples']} samples each, {cfg['epochs']} epoch, "
             f"batch {cfg['batch_size']}, {cfg['precision']}; SuLoRA has {cfg['num_slots']} "
             "slots and fuses when full.", ""]
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = {r["experience"]: r for r in records if r["method"] == method}
        for exp in (1, 10, 50, 100):
            if exp in mine:
                r = mine[exp]
                rows.append([_label(method), str(exp), f"{r['live_adapter_values']:,}",
                             f"{r['adapter_bytes'] / 2**20:.1f}",
                             f"{r['optimizer_state_bytes'] / 2**20:.2f}",
                             f"{r['peak_bytes'] / 2**20:.0f}", _num(r["train_ms"], 0),
                             _num(r["boundary_ms"], 0)])
    lines += _table(["Method", "Experience", "live adapter values", "adapter MiB",
                     "optimizer state MiB", "peak MiB", "train ms", "boundary ms"], rows)
    ratios = run["results"]["adapter_memory_last_vs_10"]
    lines += ["Adapter memory at experience 100 / at 10: " + ", ".join(
        f"{_label(m)} {v:.2f}x" for m, v in ratios.items()) + ".", ""]
    plot = path.with_suffix(".png")
    if plot.exists():
        where = plot.resolve().relative_to(output_dir.resolve())
        lines += [f"![Adapter memory over the long stream]({where})", ""]
    return lines


def data_parallel(directory: Path) -> list[str]:
    """The one-GPU vs torchrun comparisons of ``benchmarks.perf.ddp``: ``ddp.json`` (the
    summary's entries) first, then any other ``ddp_*.json`` (e.g. another batch size)."""
    paths = [directory / "ddp.json", *sorted(directory.glob("ddp_*.json"))]
    runs = [(path, run) for path in paths if (run := _optional_json(path)) is not None]
    if not runs:
        return []
    lines = ["## Data-parallel training", ""]
    for path, run in runs:
        lines += _data_parallel_run(path.name, run)
    return lines


def _data_parallel_run(file_name: str, run: dict[str, Any]) -> list[str]:
    batch = run.get("batch_size")
    role = "the summary's entries" if file_name == "ddp.json" else "not in the summary"
    lines = [f"### `{file_name}`" + (f": global batch {batch}" if batch else "") + f" ({role})", "",
             f"`python -m benchmarks.perf.ddp`: {run['strategy']} on {run['benchmark']}, the "
             f"same run on one GPU ({run['devices']['single']}) and under torchrun on "
             f"{run['world_size']} ({run['devices']['parallel']}), commit `{run['commit']}`.", ""]
    rows = [[str(r["seed"]), r["mode"], str(r["world_size"]), _num(r["train_samples_per_s"], 0),
             _num(r.get("train_epoch_seconds"), 1), _num(r.get("stream_samples_per_s"), 0),
             _num(r["train_seconds"], 1), f"{100 * r['A_last']:.2f}", _num(r["peak_memory_mb"], 0)]
            for r in run["runs"]]
    lines += _table(["Seed", "Run", "GPUs", "epoch samples/s", "epochs s", "stream samples/s",
                     "train calls s", "A_last %", "peak MiB/GPU"], rows)
    lines += [f"- Command ({name}, last seed, after `python -m`): "
              f"`{' '.join(command[2:])}`" for name, command in run["commands"].items()]
    warmup = run.get("warmup_experiences")
    lines.append("- Warm-up before the measured runs: " + (
        f"a discarded pair of {warmup}-experience runs" if warmup else "none"))
    for key in (f"ddp_{run['world_size']}gpu_speedup", f"ddp_{run['world_size']}gpu_a_last_delta"):
        entry = run[key]
        lines.append(f"- `{key}`: {entry['value']:.3f} (target {entry['target']}, "
                     f"{'pass' if entry['pass'] else 'fail'}): {entry['note']}")
    if run.get("commit_note"):
        lines.append(f"- Commit: {run['commit_note']}.")
    return lines + [""]


def data_loading(directory: Path) -> list[str]:
    """Loader throughput of ``benchmarks.perf.data_loading`` (``data_loading/``), if any."""
    path = directory / "data_loading" / "data_loading.json"
    run = _optional_json(path)
    if run is None:
        return []
    cfg = run["settings"]
    lines = ["## Data loading", "",
             f"`python -m benchmarks.perf.data_loading` on {run['device']} "
             f"({cfg['torch_threads']} torch threads), commit `{run['commit']}`: the training "
             f"loader of {cfg['benchmark']}'s first experience, batch {cfg['batch_size']}, "
             f"{cfg['samples']:,} samples timed. `pil` is torchvision's pipeline on PIL images, "
             "`array` the uint8-tensor one the benchmark uses (bit-identical outputs).", ""]
    rows = [[r["pipeline"], r["split"], str(r["num_workers"]), _num(r["samples_per_s"], 0)]
            for r in run["results"]]
    return lines + _table(["Pipeline", "Split", "workers", "samples/s"], rows)


def epoch_loading(directory: Path) -> list[str]:
    """Epoch times of ``benchmarks.perf.epoch_loading`` (``epoch_loading/``), if any."""
    run = _optional_json(directory / "epoch_loading" / "epoch_loading.json")
    if run is None:
        return []
    cfg = run["settings"]
    lines = ["## Loading across epochs", "",
             f"`python -m benchmarks.perf.epoch_loading` on {run['device']}, commit "
             f"`{run['commit']}`: {cfg['benchmark']}'s first experience ({cfg['samples']:,} "
             f"images, {cfg['steps_per_epoch']} batches of {cfg['batch_size']}), "
             f"{cfg['num_workers']} workers, {cfg['epochs']} epochs, a simulated "
             f"{cfg['step_ms']:g} ms training step per batch (the host sleeps). The first epoch "
             "counts from the loop's start: the epoch-spanning loader's workers start when it "
             "is made, just before.", ""]
    rows = [[r["loader"], _num(r["first_epoch_s"] * 1e3, 0), _num(r["later_epoch_s"] * 1e3, 0),
             _num(r["later_first_batch_s"] * 1e3, 0), _num(r["total_s"], 2)]
            for r in run["results"]]
    return lines + _table(["Loader", "first epoch ms", "later epochs ms (median)",
                           "of which first-batch wait ms", "all epochs s"], rows)


def eval_cache(directory: Path) -> list[str]:
    """The runs of ``benchmarks.perf.eval_cache`` (``eval_cache/*.json``), if any: the A/B of
    the cache, and whole runs of a long stream timed alone."""
    paths = sorted((directory / "eval_cache").glob("*.json"))
    if not paths:
        return []
    lines = ["## A run end to end, and the evaluation cache", "",
             "`python -m benchmarks.perf.eval_cache`: whole runs through the runner's stream "
             "loop, the whole test stream evaluated after every experience; `the rest` is the "
             "run's time outside training (mostly those evaluations).", ""]
    first = None
    for path in paths:
        run = json.loads(path.read_text(encoding="utf-8"))
        cfg, config = run["settings"], run["settings"]["config"]
        training, data = config["training"], config["data"]
        extra = [f"{k}={v}" for k, v in sorted(data.items())
                 if k in ("augment_on_device", "limit_per_class") and v]
        lines += [f"`{path.name}`, on {run['device']}, commit `{run['commit'][:7]}`: "
                  f"{cfg['strategy']} on {cfg['benchmark']}, {training['epochs']} epochs per "
                  f"experience, batch {training['batch_size']}, evaluation batch "
                  f"{training['eval_batch_size']}, {training['num_workers']} loader workers, "
                  f"{config['precision']}" + (f", {', '.join(extra)}" if extra else "") + ".", ""]
        rows = [["on" if r["cache"] else "off", _num(r["wall_s"], 1), _num(r["train_s"], 1),
                 _num(r["rest_s"], 1), _num(r["cached_mb"], 0),
                 _num(100 * a_last(r["accuracy_matrix"]), 2)] for r in run["runs"]]
        lines += _table(["Cache", "run s", "training s", "the rest s", "cached MiB",
                         "A_last %"], rows)
        if len(run["runs"]) > 1:
            lines.append("Accuracy matrices of these runs equal: "
                         f"{'yes' if run['matrices_equal'] else 'NO'}.")
        if run["wall_ratio"] is not None:
            lines.append(f"Without / with the cache: {run['wall_ratio']:.2f}x the run, "
                         f"{run['rest_ratio']:.2f}x the rest.")
        matrix = run["runs"][0]["accuracy_matrix"]
        gap = None
        if first is None:
            first = (path.name, matrix)
        elif len(matrix) == len(first[1]):
            gap = max(abs(a - b) for row, other in zip(matrix, first[1], strict=True)
                      for a, b in zip(row, other, strict=True))
            lines.append(f"Largest difference from `{first[0]}`'s accuracy matrix: "
                         f"{100 * gap:.1f} points.")
        if cfg["benchmark"] == "split-cifar100-50" and training["epochs"] == 2:
            wall = run["runs"][0]["wall_s"]
            same = gap is None or gap <= 0.01
            verdict = ("met" if wall <= 90 and same else "**not met**"
                       + ("" if same else " (not the first run's accuracy matrix)"))
            lines.append(f"Target: one such SuLoRA run alone on one GPU in at most 90 s, with "
                         f"the accuracy matrix of the runner's path: {wall:.1f} s, {verdict}.")
        lines.append("")
    return lines


def official_sdlora(directory: Path) -> list[str]:
    """The comparisons with the official SD-LoRA loop (``official_sdlora*/``, one run each)."""
    paths = sorted(directory.glob("official_sdlora*/official_sdlora.json"))
    if not paths:
        return []
    lines = ["## One experience at ViT-B/16, 224 px: this library against the official SD-LoRA "
             "loop", ""]
    for path in paths:
        lines += _official_run(json.loads(path.read_text(encoding="utf-8")), path.parent.name)
    return lines


def _official_run(run: dict[str, Any], folder: str) -> list[str]:
    cfg = run["settings"]
    lines = [f"`{folder}/`: `python -m benchmarks.perf.official_sdlora` on {run['device']}, "
             "commit "
             f"`{run['commit'][:7]}`, torch {run['torch']}, timm {run['versions']['timm']}: "
             f"{cfg['backbone']}, {cfg['benchmark']} resized to {cfg['image_size']} px, the first "
             f"{cfg['experiences']} experience(s) (10 classes, 5,000 training images each), "
             f"{cfg['epochs']} epoch(s) each, batch {cfg['batch_size']}, {cfg['workers']} loader "
             "workers for every party, each party in its own process, one after the other. The "
             "official loop is github.com/WuYichen-97/SD-Lora-CL's own, with "
             f"`{cfg['official_config']}` (this library: the `{cfg['recipe']}` recipe's "
             "settings). An experience's time runs from the start of its training to the end "
             "of its evaluation on the seen classes' test images; `training` is the training "
             "loop (data loading included), `evaluation` every test pass (the official loop "
             "also evaluates inside its training loop, at its epoch 0), `other` the rest "
             "(set-up, boundary work, the official loop's saving and re-loading of adapters)."
             + (" This library's parties with `--set " + " ".join(cfg["library_sets"]) + "`."
                if cfg.get("library_sets") else "")
             + (" " + run["note"] if run.get("note") else ""),
             ""]
    officials = sorted({r["precision"] for r in run["runs"] if r["party"] == "official"})
    rows = []
    for result in run["runs"]:
        compiled = result.get("compile", False)
        key = run_key(result["party"], result["precision"], compiled)
        ratios = {r["experience"]: r for r in run["ratios_to_official"].get(key, [])}
        for e in result["experiences"]:
            ratio = ratios.get(e["experience"])
            rows.append([_label(result["party"]) if result["party"] != "official"
                         else "official SD-LoRA loop",
                         result["precision"] + (", compiled" if compiled else ""),
                         str(e["experience"]), _num(e["wall_s"], 1), _num(e["train_s"], 1),
                         _num(e["eval_s"], 1), _num(e["other_s"], 1),
                         _num(e["train_images_per_s"], 0),
                         _num((e.get("epoch_images_per_s") or [None])[-1], 0),
                         _num(e["end_to_end_images_per_s"], 0),
                         _ratio_cell(ratio, "train_images_per_s"),
                         _ratio_cell(ratio, "end_to_end_images_per_s"),
                         _num((result["peak_memory_mb"] or 0) / 1024, 1)])
    lines += _table(["Party", "precision", "experience", "s", "training s", "evaluation s",
                     "other s", "training images/s", "last epoch images/s",
                     "experience images/s",
                     "x official (training)", "x official (experience)", "peak GiB"], rows)
    for precision in officials:
        lines += ["Target: this library's SD-LoRA and SuLoRA at least 1.5x the official "
                  f"loop's images per second at equal batch size and precision ({precision}):"]
        for party in ("sdlora", "sulora"):
            for compiled in (False, True):
                ratios = run["ratios_to_official"].get(run_key(party, precision, compiled), [])
                name = _label(party) + (" compiled" if compiled else "")
                for field, what in (("train_images_per_s", "training loop"),
                                    ("end_to_end_images_per_s", "whole experience"),
                                    ("last_epoch_images_per_s",
                                     "its last epoch against the official training loop")):
                    values = [r[field] for r in ratios if r.get(field) is not None]
                    if values:
                        met = "met" if min(values) >= 1.5 else "**not met**"
                        lines.append(f"- {name}, {what}: "
                                     + ", ".join(f"{v:.2f}x" for v in values)
                                     + f" (experiences 1-{len(values)}): {met}.")
    return lines + [""]


def _ratio_cell(ratio: dict[str, Any] | None, field: str) -> str:
    if ratio is None or ratio[field] is None:
        return "-"
    return f"{ratio[field]:.2f}x"


def notes(directory: Path) -> list[str]:
    """Observations that no measurement file holds (``notes.md`` beside them), verbatim."""
    path = directory / "notes.md"
    if not path.exists():
        return []
    return ["## Notes", "", path.read_text(encoding="utf-8").strip(), ""]


def load_summary(directory: Path) -> dict[str, Any]:
    """The run's ``summary.json``, or the summary built from its files when it has none."""
    path = directory / SUMMARY
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return build_summary(directory)


def render(directory: Path, output: Path, plots: Path, summary: dict[str, Any]) -> str:
    by_backbone = read_groups(directory)
    if not by_backbone:
        raise SystemExit(f"no measurement files in {directory}")
    lines = header(by_backbone) + targets(summary, list(by_backbone))
    for key, groups in by_backbone.items():
        lines += backbone_section(key, groups, plots, output.parent)
    lines += long_stream(directory, output.parent) + data_parallel(directory)
    lines += official_sdlora(directory) + eval_cache(directory)
    lines += data_loading(directory) + epoch_loading(directory)
    lines += notes(directory)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the suite's --out directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--plots", type=Path, default=DEFAULT_PLOTS,
                        help="directory of the PNG figures")
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                        help="where to publish the headline ratios")
    args = parser.parse_args(argv)
    summary = load_summary(args.directory)
    text = render(args.directory, args.output, args.plots, summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output} and {args.summary}")


if __name__ == "__main__":
    main()
