"""Input statistics of adapted layers: the uncentred covariance ``E[x x^T]`` and the mean
``E[x]`` of the inputs a layer sees, recorded by forward hooks during training or over a pass of
its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class InputRecorder:
    """Sums ``x x^T`` and ``x`` of the inputs of ``layers`` over the forward passes they see
    while attached (forward pre-hooks), tokens flattened, so every token of a sample counts;
    with ``training_only``, passes of layers in eval mode are skipped. Each pass's products
    accumulate in float32 (see :func:`_gram`), the sums over passes in float64. Nothing is
    synchronised with the host."""

    def __init__(self, layers: dict[str, nn.Module], *, training_only: bool = False) -> None:
        self.training_only = training_only
        self.sums: dict[str, Tensor] = {}
        self.first_sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [layer.register_forward_pre_hook(self._hook(name))
                         for name, layer in layers.items()]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple) -> None:
            if self.training_only and not module.training:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            acc = _gram(x).double()
            self.sums[name] = self.sums[name].add_(acc) if name in self.sums else acc
            first = x.sum(0, dtype=torch.float64)
            self.first_sums[name] = (self.first_sums[name].add_(first)
                                     if name in self.first_sums else first)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return record

    def close(self) -> None:
        """Detach the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def covariances(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Uncentred covariance ``E[x x^T]`` per layer. ``reduce`` sums a tensor over processes
        (e.g. data-parallel ranks); it gets the stacked sums, then the token counts."""
        return self._averages(self.sums, reduce)

    def means(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Mean input ``E[x]`` per layer (float64), over the same tokens as
        :meth:`covariances`; ``reduce`` as there."""
        return self._averages(self.first_sums, reduce)

    def _averages(self, sums: dict[str, Tensor],
                  reduce: Callable[[Tensor], Tensor] | None) -> dict[str, Tensor]:
        if not sums:
            raise RuntimeError("no inputs reached the adapted layers: is the experience empty?")
        names = list(sums)
        totals = [sums[name] for name in names]
        counts = torch.tensor([self.counts[name] for name in names], dtype=torch.float64)
        if reduce is not None:
            totals = list(reduce(torch.stack(totals)).unbind())
            counts = reduce(counts.to(totals[0].device)).cpu()
        return {name: s / c for name, s, c in zip(names, totals, counts.tolist(), strict=True)}


def centred(covariances: dict[str, Tensor], means: dict[str, Tensor]) -> dict[str, Tensor]:
    """The centred covariance ``E[x x^T] - E[x] E[x]^T`` of each layer, from its uncentred
    covariance and its mean (as :class:`InputRecorder` gives them), on the covariance's device
    and in its dtype."""
    return {name: c - torch.outer(means[name], means[name]).to(c)
            for name, c in covariances.items()}


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable,
    forward: Callable[[object], object],
    max_samples: int,
) -> dict[str, Tensor]:
    """Uncentred covariance ``E[x x^T]`` (float64) of each layer's inputs over the first
    ``max_samples`` samples of ``batches`` (the last batch is cut to fit), the model in eval
    mode (see :class:`InputRecorder`).

    ``forward(batch)`` runs the model on one batch; its first dimension counts samples.
    """
    recorder = InputRecorder(layers)
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            left = max_samples - seen
            if len(batch[0]) > left:
                batch = [b[:left] if torch.is_tensor(b) else b for b in batch]
            forward(batch)
            seen += len(batch[0])
            if seen >= max_samples:
                break
    finally:
        recorder.close()
        model.train(was_training)
    return recorder.covariances()


def _gram(x: Tensor) -> Tensor:
    """``x^T x`` in float32. Under CUDA autocast, of ``x`` cast to the autocast dtype (the values
    the layer's own matmul reads) with float32 accumulation and output; otherwise of ``x`` in
    float32."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        low = x.to(torch.get_autocast_dtype("cuda"))
        return torch.mm(low.T, low, out_dtype=torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        return x.T @ x
