"""Training step, inference and adapter memory of the bare backbone, PEFT's LoRA and every
continual method at the checkpoint experiences; SuLoRA's reference step is also profiled."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import fresh
from .profiling import profile_step
from .states import Adapted, Bare, Continual, PeftLoRA, continual_state
from .steps import Bench
from .timing import count_flops, progress


@dataclass
class Collected:
    """Records of every measured state, by group."""

    train: list[dict[str, Any]] = field(default_factory=list)
    inference: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] | None = None

    def step_ms(self, method: str, experience: int | None) -> float:
        """The median eager training step of ``method`` at ``experience``."""
        return next(r["median_ms"] for r in self.train if r["method"] == method
                    and r["experience"] == experience and not r["compiled"])


#: Methods also timed with a compiled backbone, by group: those of the headline ratios
#: (every compilation costs tens of seconds).
COMPILED = {"train": ("backbone", "peft_lora", "sulora", "sdlora"),
            "inference": ("backbone", "sulora")}


def compile_variants(bench: Bench, group: str, method: str,
                     experience: int | None) -> tuple[bool, ...]:
    """Eager always; compiled too, when asked for, for :data:`COMPILED` at the reference
    experience."""
    reference = experience in (None, bench.settings.reference_experience)
    wanted = bench.settings.compile and reference and method in COMPILED[group]
    return (False, True) if wanted else (False,)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_train(bench: Bench, state: Adapted, experience: int | None,
                  collected: Collected) -> None:
    """Step times (eager, compiled when asked), FLOPs, peak memory and adapter memory."""
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    key = {"method": state.name, "experience": experience}
    for compiled in compile_variants(bench, "train", state.name, experience):
        step = bench.train_step(state, bench.forward(state, compiled))
        timing = bench.timed(step, compiled=compiled)
        record = {**key, "compiled": compiled, **timing,
                  "trainable_params": state.trainable_params()}
        if not compiled:
            peak = peak_bytes(bench.device)
            record["flops"] = count_flops(step)
            collected.memory.append({**key, **state.memory(), "peak_gpu_bytes": peak})
        collected.train.append(record)
        where = f" at experience {experience}" if experience else ""
        how = ", compiled" if compiled else ""
        progress(f"  {state.name}{where}: train step {timing['median_ms']:.2f} ms{how}")


def measure_eval(bench: Bench, state: Adapted, experience: int | None,
                 collected: Collected) -> None:
    """Inference forward times in each of the state's modes (unmerged, merged, or bare)."""
    state.model.eval()
    for compiled in compile_variants(bench, "inference", state.name, experience):
        forward = bench.forward(state, compiled)
        for mode in state.eval_modes:
            merged = mode == "merged"
            if merged:
                state.merge()
            try:
                timing = bench.timed(bench.eval_call(forward), compiled=compiled)
            finally:
                if merged:
                    state.unmerge()
            collected.inference.append({"method": state.name, "experience": experience,
                                        "mode": mode, "compiled": compiled, **timing,
                                        "live_adapter_values": state.live_values()})
    state.model.train()


def measure_static(bench: Bench, state: Adapted, collected: Collected) -> None:
    """A state that does not change with experiences (bare backbone, PEFT)."""
    progress(f"{bench.spec.key}: {state.name}")
    measure_train(bench, state, None, collected)
    measure_eval(bench, state, None, collected)


def measure_continual(bench: Bench, state: Continual, collected: Collected) -> None:
    """Walk ``state`` through every experience up to the last checkpoint: adapter memory at
    each, training (at experience k) and inference (after it) at the checkpoints."""
    settings = bench.settings
    progress(f"{bench.spec.key}: {state.name}")
    for experience in range(1, settings.max_experience + 1):
        state.begin(experience)
        collected.curve.append({"method": state.name, "experience": experience,
                                "adapter_bytes": state.memory()["adapter_bytes"]})
        checkpoint = experience in settings.checkpoints
        if checkpoint:
            measure_train(bench, state, experience, collected)
            if state.name == "sulora" and experience == settings.reference_experience:
                step = bench.train_step(state, state.model)
                collected.profile = {"method": state.name, "experience": experience,
                                     **profile_step(step, bench.device, settings.profile_steps)}
        state.fake_train()
        state.finish()
        if checkpoint:
            measure_eval(bench, state, experience, collected)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_methods(bench: Bench) -> Collected:
    """Every method, one at a time on a fresh copy of the backbone."""
    collected = Collected()
    settings, device = bench.settings, bench.device
    measure_static(bench, Bare(fresh(bench.template, device)), collected)
    release(device)
    measure_static(bench, PeftLoRA(fresh(bench.template, device), settings.rank), collected)
    release(device)
    for method in settings.methods:
        state = continual_state(method, fresh(bench.template, device), settings, device,
                                bench.spec.batch_size)
        measure_continual(bench, state, collected)
        del state
        release(device)
    return collected
