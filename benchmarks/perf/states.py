"""Each method's adapter state at experience ``k`` (``k - 1`` finished experiences, one in
training), built without data or training: the methods' own plugins allocate, fuse and freeze
through a strategy stand-in, and random values take the place of trained ones."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_sulora.adapters.branch_layer import LoRABranch
from cl_sulora.adapters.config import BranchLoRAConfig, SubspaceLoRAConfig
from cl_sulora.adapters.injection import (
    add_branch_lora,
    add_subspace_lora,
    branch_lora_layers,
    merge_adapters,
    subspace_lora_layers,
    unmerge_adapters,
)
from cl_sulora.methods.inflora import InfLoRAConfig
from cl_sulora.methods.lora import BranchLoRAPlugin, IncLoRAPlugin, branch_generator
from cl_sulora.methods.olora import OLoRAConfig, OLoRAPlugin
from cl_sulora.methods.sdlora import SDLoRAConfig, SDLoRAPlugin
from cl_sulora.methods.sulora import SuLoRAPlugin
from cl_sulora.training.plugins import Autocast

from .settings import Settings

#: PEFT's LoRA targets the whole fused ``qkv`` (q, k and v); the other methods adapt q and v.
PEFT_TARGETS = ["qkv"]


def adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as the runner builds it: ``Adam`` with decoupled weight decay, which the plugins
    can rebuild from its ``defaults``."""
    return torch.optim.Adam(params, lr=1e-3, weight_decay=0.0, decoupled_weight_decay=True)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ExperienceStub:
    """What the plugins read from an Avalanche experience."""

    current_experience: int
    task_label: int = 0


@dataclass
class StrategyStub:
    """What the plugins read from and write to an Avalanche strategy."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    train_mb_size: int
    eval_mb_size: int
    experience: ExperienceStub | None = None
    loss: Tensor | None = None
    plugins: list[SupervisedPlugin] = field(default_factory=list)


class Adapted:
    """A classifier carrying one method's adapters, the optimizer over exactly its trainable
    parameters, and the method's hooks around the backward pass."""

    #: whether the backward pass must reach the input (the bare backbone has no adapter)
    input_grad: ClassVar[bool] = False
    eval_modes: ClassVar[tuple[str, ...]] = ("unmerged", "merged")

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer

    def before_backward(self, loss: Tensor) -> Tensor:
        return loss

    def after_backward(self) -> None:
        """Nothing to do after the backward pass."""

    def merge(self) -> None:
        """Nothing to merge."""

    def unmerge(self) -> None:
        """Nothing to unmerge."""

    def adapter_layers(self) -> list[nn.Module]:
        return []

    def live_values(self) -> int:
        """Adapter values the method itself counts as held."""
        return 0

    def trainable_params(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def adapter_tensors(self) -> dict[int, Tensor]:
        """Parameters and buffers of the adapter layers besides their wrapped ``nn.Linear``."""
        found: dict[int, Tensor] = {}
        for layer in self.adapter_layers():
            base = layer.base if hasattr(layer, "base") else layer.base_layer
            own = {id(t) for t in (*base.parameters(), *base.buffers())}
            found.update((id(t), t) for t in (*layer.parameters(), *layer.buffers())
                         if id(t) not in own)
        return found

    def memory(self) -> dict[str, int]:
        """Bytes of the adapter tensors and of the optimizer state of the adapter parameters."""
        tensors = self.adapter_tensors()
        state = [v for p, s in self.optimizer.state.items() if id(p) in tensors
                 for v in s.values() if torch.is_tensor(v)]
        return {"adapter_bytes": tensor_bytes(tensors.values()),
                "optimizer_state_bytes": tensor_bytes(state),
                "live_adapter_values": self.live_values(),
                "trainable_params": self.trainable_params()}


class Bare(Adapted):
    """The frozen backbone and a trained head; the backward pass runs down to the input, as it
    must for any adapter in the first block."""

    input_grad = True
    eval_modes = ("bare",)

    def __init__(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        super().__init__("backbone", model, adamw(model.head.parameters()))


class PeftLoRA(Adapted):
    """PEFT's LoRA of the same rank on every fused ``qkv`` (all of q, k and v), and the head."""

    def __init__(self, model: nn.Module, rank: int) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS,
                            lora_dropout=0.0)
        self.peft = get_peft_model(model, config)  # injects the layers into ``model`` in place
        model.head.requires_grad_(True)
        super().__init__("peft_lora", model,
                         adamw(p for p in model.parameters() if p.requires_grad))

    def adapter_layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def live_values(self) -> int:
        return sum(p.numel() for layer in self.adapter_layers()
                   for name, p in layer.named_parameters() if "lora_" in name)

    def merge(self) -> None:
        self.peft.merge_adapter()

    def unmerge(self) -> None:
        self.peft.unmerge_adapter()


class Continual(Adapted):
    """A method whose adapters change at every experience, driven through its own plugin."""

    def __init__(self, name: str, model: nn.Module, plugin: SupervisedPlugin,
                 device: torch.device, batch_size: int,
                 plugins: Iterable[SupervisedPlugin] = ()) -> None:
        super().__init__(name, model, adamw(model.head.parameters()))
        self.plugin = plugin
        self.stub = StrategyStub(model, self.optimizer, device, batch_size, batch_size,
                                 plugins=list(plugins))

    def begin(self, experience: int) -> None:
        """Start 1-based ``experience``: the plugin's ``before_training_exp`` (allocation or new
        branch, fusion, freezing, optimizer rebuilt over the trainable parameters)."""
        self.stub.experience = ExperienceStub(experience - 1)
        self.plugin.before_training_exp(self.stub)
        self.optimizer = self.stub.optimizer

    def finish(self) -> None:
        """End the experience: the plugin's ``after_training_exp``."""
        self.plugin.after_training_exp(self.stub)

    def start(self, experience: int) -> None:
        """Begin 1-based ``experience`` after every earlier one, each given trained values
        (:meth:`fake_train`) and finished."""
        for earlier in range(1, experience):
            self.begin(earlier)
            self.fake_train()
            self.finish()
        self.begin(experience)

    def fake_train(self) -> None:
        """Give the trainable adapter tensors random values, as training would."""
        raise NotImplementedError

    def before_backward(self, loss: Tensor) -> Tensor:
        self.stub.loss = loss
        self.plugin.before_backward(self.stub)
        return self.stub.loss

    def after_backward(self) -> None:
        self.plugin.after_backward(self.stub)


class SuLoRAState(Continual):
    """SuLoRA through :class:`SuLoRAPlugin`; its importance statistics get random values."""

    def adapter_layers(self) -> list[nn.Module]:
        return list(subspace_lora_layers(self.model).values())

    def live_values(self) -> int:
        return sum(layer.live_adapter_params() for layer in self.adapter_layers())

    def point(self) -> None:
        """The ``data`` allocator's pointing of the slot after the recorded training batches."""
        self.plugin.point_slot(self.stub)

    @torch.no_grad()
    def fake_train(self) -> None:
        for layer in self.adapter_layers():
            layer.lora_B_train.normal_(std=0.02)
            layer.importance_ema.uniform_()
            layer.importance_unc.uniform_()

    def merge(self) -> None:
        merge_adapters(self.model)

    def unmerge(self) -> None:
        unmerge_adapters(self.model)


class BranchState(Continual):
    """SD-LoRA, InfLoRA or O-LoRA through its branch plugin."""

    def adapter_layers(self) -> list[nn.Module]:
        return list(branch_lora_layers(self.model).values())

    def live_values(self) -> int:
        return sum(layer.live_adapter_params() for layer in self.adapter_layers())

    @torch.no_grad()
    def fake_train(self) -> None:
        for layer in self.adapter_layers():
            for p in layer.trainable_parameters():
                p.add_(torch.randn_like(p), alpha=0.02)

    def merge(self) -> None:
        merge_adapters(self.model)

    def unmerge(self) -> None:
        unmerge_adapters(self.model)


class DataFreeInfLoRAPlugin(IncLoRAPlugin):
    """InfLoRA's branches without data. The real plugin designs each branch's frozen ``A`` from
    the experience's input covariance and grows a DualGPM basis afterwards, which needs a
    strategy with data; here ``A`` is a random orthonormal basis and no DualGPM basis is kept.
    The branch is otherwise InfLoRA's: frozen ``A``, zero trainable ``B``, scale alpha / rank."""

    config: InfLoRAConfig

    def new_branch(self, strategy, layer_name, layer, experience):
        rank = self.config.rank
        gen = branch_generator(self.config.seed, layer_name, experience)
        A = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=gen)).Q.T
        return LoRABranch(A.contiguous(), torch.zeros(layer.n_out, rank),
                          scale=self.config.scaling, train_A=False)


BRANCH_PLUGINS: dict[str, type[BranchLoRAPlugin]] = {
    "sdlora": SDLoRAPlugin,
    "inflora": DataFreeInfLoRAPlugin,
    "olora": OLoRAPlugin,
}


def method_config(method: str, settings: Settings, allocator: str = "orthogonal",
                  data_max_samples: int | None = None) -> SubspaceLoRAConfig | BranchLoRAConfig:
    """The method's config at the suite's rank (other keys at their preset defaults)."""
    rank, seed = settings.rank, settings.seed
    if method == "sulora":
        samples = data_max_samples or settings.covariance_samples
        return SubspaceLoRAConfig(rank=rank, num_slots=settings.num_slots, alpha=float(rank),
                                  allocator=allocator, fusion="when_full",
                                  data_max_samples=samples, seed=seed)
    if method == "sdlora":  # SD-LoRA's alpha is a constant factor (1 in the paper)
        return SDLoRAConfig(rank=rank, seed=seed)
    config_cls = {"inflora": InfLoRAConfig, "olora": OLoRAConfig}[method]
    return config_cls(rank=rank, alpha=float(rank), seed=seed)


def method_configs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every continual method's config, and PEFT's LoRA settings, for the JSON files."""
    configs = {m: method_config(m, settings).to_dict() for m in settings.methods}
    configs["peft_lora"] = {"r": settings.rank, "lora_alpha": settings.rank,
                            "target_modules": PEFT_TARGETS, "lora_dropout": 0.0}
    return configs


def continual_state(method: str, model: nn.Module, settings: Settings, device: torch.device,
                    batch_size: int, *, allocator: str = "orthogonal",
                    data_max_samples: int | None = None) -> Continual:
    """``model`` adapted for ``method``, before its first experience."""
    config = method_config(method, settings, allocator, data_max_samples)
    # the runner's precision plugin: forward passes of the methods' own run under it
    plugins = [Autocast(device.type)] if settings.precision == "bf16" else []
    if isinstance(config, SubspaceLoRAConfig):
        add_subspace_lora(model, config)
        return SuLoRAState(method, model, SuLoRAPlugin(config), device, batch_size, plugins)
    add_branch_lora(model, config)
    plugin = BRANCH_PLUGINS[method](config)
    return BranchState(method, model, plugin, device, batch_size, plugins)
