"""A long stream end to end: ``python -m benchmarks.perf.long_stream --out DIR
(--synthetic | --backbone-dir DIR --data-root DIR) [--experiences 100]``.

SuLoRA (10 slots, fusion when full) and SD-LoRA each train every experience of the stream for
real (forward, the method's hooks, backward, AdamW) and go through their plugins' boundaries.
After every experience it records the live adapter values, the adapter tensors and optimizer
state, allocated and peak memory (CUDA, else the process's resident set), the boundary time and
the training time; it writes ``DIR/long_stream.json`` and ``DIR/long_stream.png``.

``--synthetic``: generated images (two classes per experience, each class its own mean) and a
randomly initialised ViT (``--size tiny`` or ``small``: ViT-S/4 on 32-pixel images).
Otherwise: split-cifar100-100 with the reference backbone's local weights directory.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .models import Classifier
from .results import environment, resolve_commit, write_json
from .settings import make_settings
from .states import Continual, continual_state
from .timing import autocast, progress, synchronize

METHODS = ("sulora", "sdlora")
SIZES = {"tiny": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
         "small": {"img_size": 32, "patch_size": 4}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.long_stream",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--synthetic", action="store_true", help="generated data, random ViT")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="--synthetic: the random ViT's size")
    parser.add_argument("--backbone-dir", type=Path,
                        help="real stream: local timm weights directory of the backbone")
    parser.add_argument("--data-root", type=Path, help="real stream: CIFAR-100's directory")
    parser.add_argument("--experiences", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--samples", type=int, default=256,
                        help="--synthetic: training images per experience")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per experience")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-slots", type=int, default=10, help="SuLoRA's slots")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------- streams
def synthetic_stream(experiences: int, samples: int, image_size: int,
                     seed: int = 0) -> list[TensorDataset]:
    """``experiences`` datasets of two classes each; class ``c``'s images are its mean plus
    noise. Generated one experience at a time from its own seed."""
    stream = []
    for k in range(experiences):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        means = torch.randn(2, 3, image_size, image_size, generator=gen)
        local = torch.arange(samples) % 2
        x = means[local] + 0.5 * torch.randn(samples, 3, image_size, image_size, generator=gen)
        y = 2 * k + local
        stream.append(TensorDataset(x, y, torch.zeros_like(y)))
    return stream


def synthetic_model(size: str, num_classes: int, seed: int = 0) -> tuple[Classifier, int]:
    import timm

    torch.manual_seed(seed)
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                 **SIZES[size])
    return Classifier(backbone, num_classes), SIZES[size]["img_size"]


def real_stream(args: argparse.Namespace) -> tuple[Classifier, list[Any]]:
    from cl_sulora.benchmarks.registry import build_benchmark
    from cl_sulora.models.backbones import build_backbone

    backbone = build_backbone(None, weights=args.backbone_dir)
    spec = build_benchmark(f"split-cifar100-{args.experiences}", data_root=args.data_root,
                           **backbone.benchmark_options())
    model = Classifier(backbone.module, spec.num_classes)
    return model, [e.dataset for e in spec.benchmark.train_stream]


# ------------------------------------------------------------------------------------- measures
def memory_now(device: torch.device) -> dict[str, int]:
    """Allocated and peak bytes: CUDA's allocator, else the process's resident set."""
    if device.type == "cuda":
        return {"allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_bytes": torch.cuda.max_memory_allocated(device)}
    with open("/proc/self/statm", encoding="ascii") as f:
        resident = int(f.read().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"allocated_bytes": resident, "peak_bytes": peak}


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def train_experience(state: Continual, dataset: Any, args: argparse.Namespace,
                     device: torch.device) -> int:
    """Train every batch of ``dataset`` for ``args.epochs`` epochs; returns the steps."""
    gen = torch.Generator().manual_seed(state.stub.experience.current_experience)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=gen,
                        drop_last=False)
    steps = 0
    state.model.train()
    for _ in range(args.epochs):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            with autocast(device, args.precision):
                logits = state.model(x)
            loss = state.before_backward(F.cross_entropy(logits.float(), y))
            loss.backward()
            state.after_backward()
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            steps += 1
    return steps


def run_method(method: str, model: Classifier, stream: list[Any],
               args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One method over the whole stream; one record per experience."""
    settings = replace(make_settings(tiny=True, device=str(device), compile=False, warmup=None,
                                     iters=None), num_slots=args.num_slots)
    state = continual_state(method, model.to(device), settings, device, args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    for k, dataset in enumerate(stream, start=1):
        begin_ms = timed(lambda k=k: state.begin(k), device)
        train_start = time.perf_counter()
        steps = train_experience(state, dataset, args, device)
        synchronize(device)
        train_ms = (time.perf_counter() - train_start) * 1e3
        memory = state.memory()  # while the experience's slot or branch is still training
        finish_ms = timed(state.finish, device)
        records.append({"method": method, "experience": k, "steps": steps,
                        "train_ms": train_ms, "boundary_ms": begin_ms + finish_ms,
                        "begin_ms": begin_ms, "finish_ms": finish_ms, **memory,
                        **memory_now(device)})
        if k == 1 or k % 10 == 0 or k == len(stream):
            progress(f"{method} experience {k}: live adapter values "
                     f"{memory['live_adapter_values']:,}, train {train_ms:.0f} ms, "
                     f"boundary {begin_ms + finish_ms:.1f} ms")
    return records


def ratio_100_vs_10(records: list[dict[str, Any]], method: str) -> float | None:
    """Adapter tensors + optimizer state while training the last experience / the tenth."""
    mine = {r["experience"]: r for r in records if r["method"] == method}
    if 10 not in mine:
        return None
    last = mine[max(mine)]

    def total(r: dict[str, Any]) -> int:
        return r["adapter_bytes"] + r["optimizer_state_bytes"]

    return total(last) / total(mine[10])


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("live_adapter_values", "live adapter values"),
              ("adapter_bytes", "adapter tensors (MiB)"),
              ("allocated_bytes", "allocated memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in dict.fromkeys(r["method"] for r in records):
            mine = [r for r in records if r["method"] == method]
            scale = 1 if key == "live_adapter_values" else 2**20
            ax.plot([r["experience"] for r in mine], [r[key] / scale for r in mine],
                    label=method)
        ax.set_xlabel("experience")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.synthetic and (args.backbone_dir is None or args.data_root is None):
        raise SystemExit("give --synthetic, or --backbone-dir and --data-root for the real stream")
    if not args.synthetic and 100 % args.experiences:
        raise SystemExit("the real stream splits CIFAR-100: --experiences must divide 100")
    device = torch.device(args.device)
    env = environment(device, resolve_commit(None))  # the code about to run
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    records: list[dict[str, Any]] = []
    for method in methods:
        if args.synthetic:
            model, image_size = synthetic_model(args.size, 2 * args.experiences)
            stream = synthetic_stream(args.experiences, args.samples, image_size)
        else:
            model, stream = real_stream(args)
        records += run_method(method, model, stream, args, device)
        del model, stream
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"group": "long_stream", **env,
               "settings": {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(args).items()},
               "results": {"records": records,
                           "adapter_memory_last_vs_10": {m: ratio_100_vs_10(records, m)
                                                         for m in methods}}}
    write_json(args.out / "long_stream.json", payload)
    if not args.no_plot:
        plot(records, args.out / "long_stream.png")
    progress(f"wrote {args.out / 'long_stream.json'}")
    return payload


if __name__ == "__main__":
    main()
