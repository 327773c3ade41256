"""The baselines: each method's defining property, and every method end to end on both models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from cl_sulora import IncLoRA, InfLoRA, JointLoRA, OLoRA, SDLoRA, SeqLoRA
from cl_sulora.adapters.branch_layer import BranchLoRALinear, LoRABranch
from cl_sulora.adapters.injection import branch_lora_layers
from cl_sulora.methods.full_finetuning import ReplayClassMask
from cl_sulora.methods.inflora import old_input_basis, store_input_basis
from cl_sulora.methods.registry import METHODS
from cl_sulora.methods.sdlora import SDLoRAConfig, distil_new_direction
from cl_sulora.models import ContinualClassifier, make_head
from cl_sulora.training.plugins import MASK_VALUE
from tests.helpers import TinyBert, image_stream, text_stream, tiny_vit

# small ranks so that everything fits the 32-wide tiny models
SMALL = {"sulora": {"rank": 2, "num_slots": 3}, "sulora-nofusion": {"rank": 2, "num_slots": 3},
         "replay": {"mem_size": 8}, "ranpac": {"projection_dim": 64}}
BRANCH_METHODS = ("sdlora", "sdlora-rr", "sdlora-kd", "inflora", "olora", "seqlora", "inclora",
                  "jointlora")


class Hook(SupervisedPlugin):
    """Calls ``fn(strategy)`` at one Avalanche event."""

    def __init__(self, event: str, fn) -> None:
        super().__init__()
        setattr(self, event, lambda strategy, **kwargs: fn(strategy))


def build(name: str, model, plugins=(), epochs: int = 2, **overrides):
    spec = METHODS[name]
    config = None
    if spec.config_cls is not None:
        values = dict(spec.defaults)
        if name in BRANCH_METHODS:
            values |= {"rank": 2, "alpha": 1.0 if name.startswith("sdlora") else 2.0}
        values |= SMALL.get(name, {}) | overrides
        config = spec.config_cls(**values)
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    return spec.strategy(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                         config=config, train_mb_size=8, train_epochs=epochs,
                         evaluator=evaluator, plugins=list(plugins))


def vit_classifier():
    torch.manual_seed(0)
    return ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))


def first_layer(model) -> BranchLoRALinear:
    return next(iter(branch_lora_layers(model).values()))


def snapshot(model) -> list[list[dict[str, torch.Tensor]]]:
    return [[{k: v.detach().clone() for k, v in b.named_parameters()} for b in layer.branches]
            for layer in branch_lora_layers(model).values()]


# ---------------------------------------------------------------------- the branch layer
def random_layer(out_index=None) -> BranchLoRALinear:
    torch.manual_seed(1)
    layer = BranchLoRALinear(torch.nn.Linear(8, 12), out_index=out_index)
    n_out = layer.n_out
    layer.add_branch(LoRABranch(torch.randn(2, 8), torch.randn(n_out, 2), magnitude=0.7,
                                normalise="product", train_A=False, train_B=False))
    layer.add_branch(LoRABranch(torch.randn(3, 8), torch.randn(n_out, 3), magnitude=1.3,
                                normalise="factors", train_A=False, train_B=False))
    layer.add_branch(LoRABranch(torch.randn(2, 8), torch.randn(n_out, 2), scale=0.5))
    return layer


def by_hand(layer: BranchLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``W0 x + sum_t c_t B_t A_t x`` from the formula, on the adapted output rows only."""
    weight = layer.base.weight.detach().clone()
    rows = layer.out_index if layer.out_index is not None else torch.arange(layer.out_features)
    for b in layer.branches:
        product = b.B @ b.A
        norm = {"none": 1.0, "product": torch.linalg.matrix_norm(product),
                "factors": b.B.norm() * b.A.norm()}[b.normalise]
        magnitude = 1.0 if b.magnitude is None else b.magnitude
        weight[rows] += (b.scale * magnitude * product / norm).detach()
    return F.linear(x, weight, layer.base.bias)


@pytest.mark.parametrize("out_index", [None, torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])])
def test_branch_layer_forward_merge_unmerge(out_index):
    layer = random_layer(out_index)
    x = torch.randn(5, 4, 8)
    original = layer.base.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, by_hand(layer, x))
        if out_index is not None:  # only the adapted rows move
            torch.testing.assert_close(y[..., 4:8], layer.base(x)[..., 4:8])
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        assert torch.equal(layer.base.weight, original)
        assert torch.equal(layer(x), y)
    with pytest.raises(RuntimeError, match="merged"):
        layer.merge()
        layer.add_branch(LoRABranch(torch.randn(1, 8), torch.randn(layer.n_out, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_index", [None, torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])])
def test_branch_layer_weight_path_matches_activation_path(out_index, dtype):
    layer = random_layer(out_index).to(dtype)
    x = torch.randn(5, 4, 8, dtype=dtype)
    with torch.no_grad():
        activations = layer.forward_activations(x)
        no_grad = layer(x)  # no gradient needed: the weight path
    torch.testing.assert_close(no_grad, layer.forward_weight(x), rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(no_grad, activations, rtol=tol, atol=tol)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), no_grad, rtol=0, atol=0)
    # with gradients: the activation path, and the branches get their gradients
    layer(x).float().sum().backward()
    assert layer.branches[2].B.grad is not None and layer.branches[0].magnitude.grad is not None
    assert layer.base.weight.grad is None


def test_branch_layer_state_dict_round_trip_refreshes_the_caches():
    layer, fresh = random_layer(), random_layer()
    with torch.no_grad():
        for branch in layer.branches:
            branch.A.mul_(2.0)  # change the frozen tensors the caches were built from
    layer.refresh()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_branch_layer_trains_only_flagged_tensors():
    layer = random_layer()
    first, second, third = layer.branches
    second.train_magnitude = False
    expected = [first.magnitude, third.A, third.B]
    assert [id(p) for p in layer.trainable_parameters()] == [id(p) for p in expected]
    layer(torch.randn(3, 8)).sum().backward()
    assert first.magnitude.grad is not None  # frozen direction, live magnitude
    assert first.A.grad is None and second.B.grad is None and third.B.grad is not None
    assert layer.live_adapter_params() == (2 * 8 + 12 * 2) + (3 * 8 + 12 * 3) + 2 * 20
    assert [id(p) for p in layer.magnitude_parameters()] == [id(first.magnitude),
                                                             id(second.magnitude)]


# ---------------------------------------------------------------------- SD-LoRA
def test_sdlora_freezes_old_directions_trains_magnitudes_and_matches_formula():
    model = vit_classifier()
    bm = image_stream()
    strategy = build("sdlora", model)
    strategy.train(bm.train_stream[0])
    before = snapshot(model)
    layers = branch_lora_layers(model).values()
    magnitudes = [layer.branches[0].magnitude.item() for layer in layers]
    strategy.train(bm.train_stream[1])
    after = snapshot(model)
    for old, new in zip(before, after, strict=True):
        assert len(new) == 2
        assert torch.equal(old[0]["A"], new[0]["A"]) and torch.equal(old[0]["B"], new[0]["B"])
    new_magnitudes = [layer.branches[0].magnitude.item() for layer in layers]
    assert all(a != b for a, b in zip(magnitudes, new_magnitudes, strict=True))
    layer = first_layer(model)
    assert [b.normalise for b in layer.branches] == ["product", "product"]
    x = torch.randn(4, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand(layer, x))


def test_sdlora_shares_one_magnitude_per_experience_across_layers_as_the_reference_code():
    model = vit_classifier()
    bm = image_stream()
    strategy = build("sdlora", model)
    for exp in bm.train_stream:
        strategy.train(exp)
    layers = list(branch_lora_layers(model).values())
    assert len(layers) > 1
    for t in range(2):
        assert len({id(layer.branches[t].magnitude) for layer in layers}) == 1
    trained_scalars = [p for p in strategy.optimizer.param_groups[0]["params"] if p.dim() == 0]
    assert len(trained_scalars) == 2  # m_1 and m_2, each shared by every layer
    values = sum(b.A.numel() + b.B.numel() for layer in layers for b in layer.branches)
    assert strategy.adapter_report()["live_adapter_params"] == values + 2

    per_layer = vit_classifier()
    strategy = build("sdlora", per_layer, magnitude_scope="layer")
    for exp in bm.train_stream:
        strategy.train(exp)
    layers = list(branch_lora_layers(per_layer).values())
    assert len({id(layer.branches[0].magnitude) for layer in layers}) == len(layers)
    assert strategy.adapter_report()["live_adapter_params"] == values + 2 * len(layers)


def test_sdlora_shared_magnitudes_survive_a_checkpoint(tmp_path):
    from cl_sulora.runner.checkpoint import latest_checkpoint, restore, save_checkpoint

    bm = image_stream()
    model = vit_classifier()
    strategy = build("sdlora", model)
    strategy.train(bm.train_stream[0])
    save_checkpoint(tmp_path, position=0, strategy=strategy, extra={})
    strategy.train(bm.train_stream[1])

    resumed_model = vit_classifier()
    resumed = build("sdlora", resumed_model)
    restore(resumed, latest_checkpoint(tmp_path), [bm.train_stream[0]])
    layers = list(branch_lora_layers(resumed_model).values())
    assert len({id(layer.branches[0].magnitude) for layer in layers}) == 1
    resumed.train(bm.train_stream[1])
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    resumed_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed_model(x), model(x), rtol=1e-5, atol=1e-5)


def test_sdlora_kd_needs_per_layer_magnitudes():
    with pytest.raises(ValueError, match="magnitude_scope='layer'"):
        SDLoRAConfig(kd_threshold=9e-4)
    assert SDLoRAConfig(**METHODS["sdlora-kd"].defaults).magnitude_scope == "layer"


def test_sdlora_rr_uses_the_scheduled_ranks():
    reference = SDLoRAConfig(**METHODS["sdlora-rr"].defaults)
    # the reference code: rank 8 once _cur_task >= 4, 6 once >= 8 (0-based tasks)
    assert [reference.rank_at(t) for t in range(10)] == [10, 10, 10, 10, 8, 8, 8, 8, 6, 6]
    model = vit_classifier()
    bm = image_stream()
    strategy = build("sdlora-rr", model, rank=3, rank_schedule={1: 2})
    for exp in bm.train_stream:
        strategy.train(exp)
    for layer in branch_lora_layers(model).values():
        assert [b.rank for b in layer.branches] == [3, 2]


def test_sdlora_kd_drops_a_combination_of_old_directions_and_keeps_a_new_one():
    torch.manual_seed(0)
    layer = BranchLoRALinear(torch.nn.Linear(16, 24))
    old = [LoRABranch(torch.randn(2, 16), torch.randn(24, 2), magnitude=m, normalise="product",
                      train_A=False, train_B=False) for m in (0.5, 1.5)]
    for branch in old:
        layer.add_branch(branch)
    # a new pair whose product is exactly 0.3 D_1 - 2 D_2
    unit = [b.B / torch.linalg.matrix_norm(b.B @ b.A) for b in old]
    A = torch.cat([old[0].A, old[1].A])
    B = torch.cat([0.3 * unit[0], -2.0 * unit[1]], dim=1)
    layer.add_branch(LoRABranch(A, B, magnitude=0.8, normalise="product"))
    x = torch.randn(6, 16)
    with torch.no_grad():
        y = layer(x)
        assert distil_new_direction(layer, 9e-4)
        assert len(layer.branches) == 2
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-4)  # function kept
    layer.add_branch(LoRABranch(torch.randn(2, 16), torch.randn(24, 2), magnitude=0.8,
                                normalise="product"))
    assert not distil_new_direction(layer, 9e-4)
    assert len(layer.branches) == 3


def test_sdlora_reference_code_behaviour():
    seen = {}

    def record(strategy):
        layer = first_layer(strategy.model)
        seen[int(strategy.experience.current_experience)] = [
            (b.normalise, float(b.magnitude), float(b.B.abs().sum())) for b in layer.branches]

    model = vit_classifier()
    bm = image_stream()
    strategy = build("sdlora", model, plugins=[Hook("before_training_exp", record)],
                     reference_code_behaviour=True)
    for exp in bm.train_stream:
        strategy.train(exp)
    assert seen[0] == [("none", pytest.approx(0.8), 0.0)]
    (old_norm, old_mag, old_b), (new_norm, new_mag, new_b) = seen[1]
    assert (old_norm, new_norm) == ("factors", "none")
    assert old_mag == pytest.approx(0.8) and new_mag == pytest.approx(0.8)  # re-initialised
    assert old_b > 0 and new_b == 0.0


# ---------------------------------------------------------------------- InfLoRA
def test_inflora_designs_a_frozen_down_projection_outside_the_old_subspace():
    seen = {}

    def record(strategy):
        if strategy.experience.current_experience == 1:
            for name, layer in branch_lora_layers(strategy.model).items():
                new = layer.branches[-1]
                seen[name] = (old_input_basis(layer).float(), new.A.detach().clone(),
                              new.A.requires_grad, new.B.requires_grad)

    model = vit_classifier()
    bm = image_stream()
    strategy = build("inflora", model, plugins=[Hook("before_training_exp", record)])
    for exp in bm.train_stream:
        strategy.train(exp)
    for name, layer in branch_lora_layers(model).items():
        basis, A, A_trains, B_trains = seen[name]
        assert basis.shape[0] > 0
        assert not A_trains and B_trains
        assert torch.equal(layer.branches[-1].A, A)  # not trained
        torch.testing.assert_close(A @ basis.T, torch.zeros(A.shape[0], basis.shape[0]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), atol=1e-5, rtol=0)
    stored = sum(layer.input_basis.numel() for layer in branch_lora_layers(model).values())
    assert strategy.adapter_report()["stored_state_params"] == stored > 0


def test_inflora_designs_a_from_the_left_singular_vectors_of_the_projected_covariance():
    """After experience 1, A spans the top eigenvectors of P C^2 P, where C is the covariance
    of the layer's inputs over the experience (recorded as the plugin does, before the branch
    trains) and P projects out the old basis: the data decides A, not chance."""
    from cl_sulora.methods.inflora import experience_covariances

    seen = {}

    def record(strategy):
        if strategy.experience.current_experience != 1:
            return
        layers = branch_lora_layers(strategy.model)
        covariances = experience_covariances(strategy, layers, strategy.config, 1)
        for name, layer in layers.items():
            seen[name] = (covariances[name], old_input_basis(layer), layer.branches[-1].A)

    model = vit_classifier()
    strategy = build("inflora", model, plugins=[Hook("before_training_exp", record)])
    for exp in image_stream().train_stream:
        strategy.train(exp)
    for cov, old, A in seen.values():
        proj = torch.eye(cov.shape[0], dtype=torch.float64) - old.T @ old
        values, vectors = torch.linalg.eigh(proj @ cov @ cov @ proj)
        top = vectors[:, -A.shape[0]:]  # the rank largest, as columns
        assert float(values[-A.shape[0]] / values[-A.shape[0] - 1]) > 1.01  # a clear gap
        torch.testing.assert_close(A.double().T @ A.double(), top @ top.T, atol=1e-4, rtol=0)


def test_inflora_dualgpm_thresholds_squared_singular_values():
    """Eigenvalues 4, 2, 1, 1: 70% of sum(lambda) needs two directions, 70% of sum(lambda^2)
    one (16/22); the reference code's rule keeps one."""
    from cl_sulora.methods.inflora import grown_basis

    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    cov = basis @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0],
                                          dtype=torch.float64)) @ basis.T
    grown = grown_basis(torch.zeros(0, 6, dtype=torch.float64), cov, 0.7, 6)
    assert grown.shape[0] == 1
    torch.testing.assert_close((grown @ basis[:, 0]).abs(), torch.ones(1, dtype=torch.float64))


def test_inflora_threshold_grows_to_energy_final_over_the_stream():
    from cl_sulora.methods.inflora import InfLoRAConfig

    config = InfLoRAConfig(energy=0.95)
    assert [round(config.energy_at(t, 10), 6) for t in range(3)] == [0.95, 0.955, 0.96]
    assert [round(config.energy_at(t, 5), 6) for t in range(3)] == [0.95, 0.96, 0.97]
    fixed = InfLoRAConfig(energy=0.9, energy_final=0.98, num_experiences=4)
    assert round(fixed.energy_at(2, 10), 6) == 0.94


def test_inflora_dual_storage_keeps_the_smaller_side():
    layer = BranchLoRALinear(torch.nn.Linear(10, 4))
    basis = torch.linalg.qr(torch.randn(10, 7, dtype=torch.float64))[0].T  # 7 of 10 dims
    store_input_basis(layer, basis)
    assert bool(layer.basis_is_complement) and layer.input_basis.shape == (3, 10)
    restored = old_input_basis(layer)
    torch.testing.assert_close(restored.T @ restored, basis.T @ basis, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- O-LoRA
def test_olora_penalty_equals_the_formula():
    model = vit_classifier()
    bm = image_stream()
    strategy = build("olora", model, lambda1=0.5, lambda2=0.1)
    for exp in bm.train_stream:
        strategy.train(exp)
    expected = 0.0
    for layer in branch_lora_layers(model).values():
        old, new = layer.branches
        assert old.frozen and not new.frozen
        expected += 0.5 * float((old.A @ new.A.T).abs().sum())
        # the reference code's L2 term: the unsquared Frobenius norms of the new A and B
        expected += 0.1 * float(new.A.norm() + new.B.norm())
    plugin = strategy.method_plugin
    assert float(plugin.penalty(model)) == pytest.approx(expected, rel=1e-5)
    fake = SimpleNamespace(model=model, loss=torch.tensor(2.0))
    plugin.before_backward(fake)
    assert float(fake.loss) == pytest.approx(2.0 + expected, rel=1e-5)


def test_olora_defaults_are_the_reference_codes():
    from cl_sulora.methods.olora import OLoRAConfig
    from cl_sulora.runner.presets import load_preset

    config = OLoRAConfig()
    assert (config.rank, config.scaling, config.dropout) == (8, 4.0, 0.1)  # lora_alpha=32
    assert (config.lambda1, config.lambda2) == (0.5, 0.0)
    preset = load_preset("olora").method
    assert (preset["alpha"], preset["dropout"]) == (32.0, 0.1)


def test_branch_dropout_acts_on_the_branches_input_in_training_only():
    torch.manual_seed(0)
    layer = BranchLoRALinear(torch.nn.Linear(8, 6), dropout=0.5)
    layer.add_branch(LoRABranch(torch.randn(2, 8), torch.randn(6, 2)))
    x = torch.randn(4, 8)
    undropped = layer.forward_weight(x)
    layer.train()
    torch.manual_seed(1)
    dropped = layer(x)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)
    A, B = layer.branches[0].A, layer.branches[0].B
    torch.testing.assert_close(dropped, layer.base(x) + (x * mask) @ A.T @ B.T)
    assert not torch.allclose(dropped, undropped)
    layer.eval()
    torch.testing.assert_close(layer(x), undropped)  # no dropout at evaluation


# ---------------------------------------------------------------------- plain LoRA baselines
def test_seqlora_changes_its_one_lora():
    model = vit_classifier()
    bm = image_stream()
    strategy = build("seqlora", model)
    strategy.train(bm.train_stream[0])
    before = snapshot(model)
    strategy.train(bm.train_stream[1])
    for old, new in zip(before, snapshot(model), strict=True):
        assert len(new) == 1
        assert not torch.equal(old[0]["A"], new[0]["A"])
        assert not torch.equal(old[0]["B"], new[0]["B"])


def test_inclora_adds_a_branch_and_freezes_the_old_one():
    model = vit_classifier()
    bm = image_stream()
    strategy = build("inclora", model)
    strategy.train(bm.train_stream[0])
    before = snapshot(model)
    strategy.train(bm.train_stream[1])
    for old, new in zip(before, snapshot(model), strict=True):
        assert len(new) == 2
        assert all(torch.equal(old[0][k], new[0][k]) for k in ("A", "B"))


def test_jointlora_sees_all_data_in_one_experience():
    seen = []
    model = vit_classifier()
    bm = image_stream()
    record = Hook("before_training_exp", lambda s: seen.append(
        (len(s.adapted_dataset), sorted(set(int(t) for t in s.adapted_dataset.targets)))))
    strategy = build("jointlora", model, plugins=[record])
    strategy.train(bm.train_stream)
    total = sum(len(exp.dataset) for exp in bm.train_stream)
    assert seen == [(total, [0, 1, 2, 3])]
    assert model.head.classifier.out_features == 4
    with pytest.raises(RuntimeError, match="once"):
        strategy.train(bm.train_stream)


# ---------------------------------------------------------------------- Avalanche baselines
def test_replay_keeps_buffered_classes_unmasked():
    allowed = []

    def record(strategy):
        mask = next(p for p in strategy.plugins if isinstance(p, ReplayClassMask))
        allowed.append(list(mask._allowed))

    model = vit_classifier()
    bm = image_stream()
    strategy = build("replay", model, plugins=[Hook("after_training_iteration", record)])
    for exp in bm.train_stream:
        strategy.train(exp)
    assert allowed[0] == [0, 1] and allowed[-1] == [0, 1, 2, 3]
    assert strategy.adapter_report()["stored_state_params"] == 8 * 3 * 8 * 8


def test_lwf_distils_unmasked_logits():
    penalties, masked_after = [], []

    def distilled(strategy):
        if strategy.experience.current_experience == 1:
            assert not bool((strategy.mb_output[:, :2] == MASK_VALUE).any())
            penalties.append(float(lwf.lwf(strategy.mb_x, strategy.mb_output, strategy.model)))

    def after(strategy):
        if strategy.experience.current_experience == 1:
            masked_after.append(bool((strategy.mb_output[:, :2] == MASK_VALUE).all()))

    model = vit_classifier()
    bm = image_stream()
    strategy = build("lwf", model, plugins=[Hook("before_backward", distilled),
                                            Hook("after_training_iteration", after)])
    lwf = strategy.lwf
    for exp in bm.train_stream:
        strategy.train(exp)
    assert penalties and all(p > 0 for p in penalties)
    assert masked_after and all(masked_after)  # the cross-entropy's view is the masked one


def test_lwf_distils_every_earlier_head_of_a_multi_head_model():
    """Task-incremental: the previous model answers for every task it has seen; its state
    survives a checkpoint round trip."""
    penalties = []

    def distilled(strategy):
        if strategy.experience.current_experience == 1:
            penalties.append(float(lwf.lwf(strategy.mb_x, strategy.mb_output, strategy.model)))

    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("task-incremental", 32))
    bm = image_stream(task_labels=True)
    strategy = build("lwf", model, plugins=[Hook("before_backward", distilled)])
    lwf = strategy.lwf
    for exp in bm.train_stream:
        strategy.train(exp)
    assert penalties and all(p > 0 for p in penalties)
    x = bm.train_stream[0].dataset[0][0][None]
    previous = lwf.lwf.prev_model
    assert set(previous(x, None)) == {0, 1}  # both tasks' heads
    before = lwf.lwf(x, None, strategy.model)
    lwf.load_state_dict(lwf.state_dict(), strategy)
    assert lwf.lwf.prev_model is not previous
    torch.testing.assert_close(lwf.lwf(x, None, strategy.model), before)
    results = strategy.eval(bm.test_stream)
    assert 0.0 <= results["Top1_Acc_Stream/eval_phase/test_stream/Task001"] <= 1.0


# ---------------------------------------------------------------------- every method, end to end
def test_registry_holds_every_method():
    expected = {"sdlora", "sdlora-rr", "sdlora-kd", "inflora", "olora", "seqlora", "inclora",
                "jointlora", "naive", "ewc", "lwf", "replay"}
    assert expected <= set(METHODS)
    exported = {"sdlora": SDLoRA, "inflora": InfLoRA, "olora": OLoRA, "seqlora": SeqLoRA,
                "inclora": IncLoRA, "jointlora": JointLoRA}
    assert all(METHODS[name].strategy is cls for name, cls in exported.items())
    for spec in METHODS.values():
        if spec.config_cls is not None:
            spec.config_cls(**spec.defaults)


@pytest.mark.parametrize("backbone", ["vit", "bert"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_two_experiences(name, backbone):
    torch.manual_seed(0)
    if backbone == "vit":
        body, stream = tiny_vit(), image_stream()
    else:
        body, stream = TinyBert(), text_stream()
    model = ContinualClassifier(body, make_head("class-incremental", 32))
    strategy = build(name, model, epochs=1)
    if name == "jointlora":
        strategy.train(stream.train_stream)
    else:
        for exp in stream.train_stream:
            strategy.train(exp)
    results = strategy.eval(stream.test_stream)
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0.0 <= accuracy <= 1.0 and not math.isnan(accuracy)
    assert model(next(iter(stream.test_stream[1].dataset))[0][None]).shape == (1, 4)
    report = strategy.adapter_report()
    assert set(report) == {"live_adapter_params", "stored_state_params"}
    assert all(isinstance(v, int) and v >= 0 for v in report.values())
    assert (report["live_adapter_params"] > 0) == (name in BRANCH_METHODS or "sulora" in name)
    if name in ("ewc", "lwf", "replay", "inflora", "ranpac"):
        assert report["stored_state_params"] > 0


def stream_without_task_labels():
    """An Avalanche class-incremental stream whose datasets carry no task labels (plain
    ``benchmark_from_datasets`` with a class timeline)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    def dataset(first_class: int):
        g = torch.Generator().manual_seed(first_class)
        y = torch.arange(first_class, first_class + 2).repeat(6)
        data = TensorDataset(torch.randn(len(y), 3, 8, 8, generator=g), y)
        data.targets = y.tolist()
        return as_classification_dataset(data)

    return with_classes_timeline(benchmark_from_datasets(
        train=[dataset(0), dataset(2)], test=[dataset(0), dataset(2)]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_on_a_stream_without_task_labels(name):
    bm = stream_without_task_labels()
    assert not hasattr(bm.train_stream[0].dataset, "targets_task_labels")
    strategy = build(name, vit_classifier(), epochs=1)
    if METHODS[name].joint:
        strategy.train(bm.train_stream)
    else:
        for exp in bm.train_stream:
            strategy.train(exp)
    results = strategy.eval(bm.test_stream)
    accuracy = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))
    assert 0.0 <= accuracy <= 1.0


# ---------------------------------------------------------------------- adapter-free baseline
def test_frozen_trains_the_head_and_nothing_else():
    torch.manual_seed(0)
    stream = image_stream()
    model = vit_classifier()
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimized, moved = [], []

    def start(strategy):
        optimized.append({id(p) for g in strategy.optimizer.param_groups for p in g["params"]})
        start.head = {k: v.detach().clone() for k, v in model.head.named_parameters()}

    def end(strategy):
        after = dict(model.head.named_parameters())
        moved.append(all(not torch.equal(start.head[k], after[k]) for k in start.head))

    strategy = build("frozen", model, plugins=[Hook("before_training_epoch", start),
                                               Hook("after_training_exp", end)])
    for exp in stream.train_stream:
        strategy.train(exp)
    assert all(torch.equal(backbone[k], v) for k, v in model.backbone.state_dict().items())
    # each experience optimizes exactly the head, grown to its classes, and every head tensor moves
    assert optimized[-1] == {id(p) for p in model.head.parameters()}
    assert model.head.classifier.out_features == 4 and moved == [True, True]
    assert strategy.adapter_report() == {"live_adapter_params": 0, "stored_state_params": 0}


def test_frozen_config_errors():
    from pydantic import ValidationError

    from cl_sulora import FrozenBackbone, FrozenConfig

    with pytest.raises(ValidationError, match="trainable_modules"):
        FrozenConfig(trainable_modules=[])
    model = vit_classifier()
    with pytest.raises(ValueError, match="trainable_modules.*name no module.*head's name"):
        FrozenBackbone(model=model, optimizer=torch.optim.Adam(model.parameters()),
                       config=FrozenConfig(trainable_modules=["classifier_head"]))


@pytest.mark.parametrize("name", ["seqlora", "inclora", "sdlora"])
def test_training_a_merged_branch_model_is_refused(name):
    """A merged weight holds the branches' update: training the branches then changes nothing
    the model computes (SeqLoRA, whose one branch is never replaced, would train in vain)."""
    from cl_sulora import merge_adapters

    stream = image_stream(n_classes=4, n_experiences=2)
    strategy = build(name, vit_classifier(), epochs=1)
    strategy.train(stream.train_stream[0])
    merge_adapters(strategy.model)
    with pytest.raises(RuntimeError, match="cannot train while merged: call unmerge"):
        strategy.train(stream.train_stream[1])
