"""The timed calls of one backbone: a training step and an inference forward on shared inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import Classifier
from .settings import BackboneSpec, Settings
from .states import Adapted
from .timing import autocast, summarise, time_calls

Forward = Callable[[Tensor], Tensor]


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks met by ``torch.compile`` so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@dataclass(frozen=True)
class Bench:
    """What every measurement of one backbone shares: settings, device, template, batch."""

    spec: BackboneSpec
    settings: Settings
    device: torch.device
    template: Classifier
    batch: tuple[Tensor, Tensor]

    def timed(self, fn: Callable[[], Any], *, compiled: bool = False) -> dict[str, Any]:
        """Median and raw milliseconds of ``fn`` over the settings' iterations; for a compiled
        ``fn`` also the graphs compiled and the graph breaks met meanwhile (graphs compiled
        beyond the warm-up calls mean recompilation in the timed calls)."""
        before = dynamo_counts()
        times = time_calls(fn, self.device, warmup=self.settings.warmup,
                           iters=self.settings.iters)
        result = summarise(times)
        if compiled:
            after = dynamo_counts()
            result["dynamo"] = {key: after[key] - before[key] for key in after}
        return result

    def forward(self, state: Adapted, compiled: bool) -> Forward:
        """The state's model, or its head on a ``torch.compile``d backbone (compiled afresh:
        every state's backbone shares timm's code object and its recompilation limit)."""
        model = state.model
        if not compiled:
            return model
        torch._dynamo.reset()
        backbone = torch.compile(model.backbone)
        return lambda x: model.head(backbone(x))

    def train_step(self, state: Adapted, forward: Forward) -> Callable[[], None]:
        """Forward under autocast, float32 loss, the method's hooks, backward, AdamW step."""
        x, y = self.batch

        def step() -> None:
            inputs = x.detach().requires_grad_() if state.input_grad else x
            with autocast(self.device, self.settings.precision):
                logits = forward(inputs)
            loss = state.before_backward(F.cross_entropy(logits.float(), y))
            loss.backward()
            state.after_backward()
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)

        return step

    def eval_call(self, forward: Forward) -> Callable[[], None]:
        """One inference forward of the batch under autocast."""
        x = self.batch[0]

        def call() -> None:
            with torch.inference_mode(), autocast(self.device, self.settings.precision):
                forward(x)

        return call
