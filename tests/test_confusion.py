"""The long-text study's diagnostic of where a new task's errors go (``confusion.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks/results/accuracy/long-text/confusion.py"
CENTRED = SCRIPT.parent / "levers" / "centred.py"


def load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagonal_errors_are_counted_by_the_predicted_class_task(tmp_path):
    plugin = load_script().DiagonalConfusion(str(tmp_path / "c.json"), {"experiences": []})
    strategy = SimpleNamespace()

    def train(index, classes):
        strategy.experience = SimpleNamespace(current_experience=index,
                                              classes_in_this_experience=classes)
        plugin.after_training_exp(strategy)

    def evaluate(index, truth, predicted, classes=10):
        strategy.experience = SimpleNamespace(current_experience=index)
        strategy.mb_y = torch.tensor(truth)
        strategy.mb_output = torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()
        plugin.after_eval_iteration(strategy)

    train(0, [0, 1])
    evaluate(0, [0, 1], [0, 0])
    plugin.after_eval(strategy)
    train(1, [2, 3, 4])
    evaluate(0, [0, 1], [3, 3])  # another experience than the one just trained: not counted
    evaluate(1, [2, 3, 4, 4], [2, 4, 0, 1])
    evaluate(1, [3, 2, 2, 4], [3, 0, 0, 9])  # class 9 belongs to no task seen yet
    plugin.after_eval(strategy)
    first, second = json.loads((tmp_path / "c.json").read_text())["experiences"]
    assert first == {"experience": 0, "examples": 2, "accuracy": 0.5, "wrong_same_task": 0.5,
                     "wrong_earlier_tasks": 0.0, "wrong_by_task": {},
                     "wrong_unseen_classes": 0.0}
    assert second["experience"] == 1 and second["examples"] == 8
    assert second["accuracy"] == 2 / 8
    assert second["wrong_same_task"] == 1 / 8  # 3 predicted as 4
    assert second["wrong_by_task"] == {"0": 4 / 8}
    assert second["wrong_earlier_tasks"] == 4 / 8 and second["wrong_unseen_classes"] == 1 / 8


def test_centred_lab_check_centres_the_recorded_input_covariance(monkeypatch):
    from cl_sulora.methods.input_statistics import InputRecorder

    centred = load_script(CENTRED)
    monkeypatch.setattr(InputRecorder, "covariances", centred.covariances)
    layer = torch.nn.Linear(3, 2)
    recorder = InputRecorder({"layer": layer})
    x = torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(0)) + 4.0
    layer(x[0])
    layer(x[1])  # two passes: the means accumulate like the products
    flat = x.reshape(-1, 3).double()
    expected = torch.cov(flat.T, correction=0)
    assert torch.allclose(recorder.covariances()["layer"], expected, atol=1e-5)


def test_first_slot_lab_check_centres_the_rows_of_the_first_experience_only(monkeypatch):
    lab = load_script(CENTRED)
    seen = []
    monkeypatch.setattr(lab, "prepare", lambda allocator, layers, covariances, means=None:
                        seen.append(allocator.centred_rows))
    allocator = SimpleNamespace(centred_rows=True)
    empty = SimpleNamespace(input_basis=torch.zeros(0, 3))
    grown = SimpleNamespace(input_basis=torch.zeros(2, 3))
    lab.prepare_first_centred(allocator, {"q": empty, "v": empty}, {}, {})
    lab.prepare_first_centred(allocator, {"q": empty, "v": grown}, {}, {})
    assert allocator.centred_rows is True  # the configured value, back after each experience
    allocator.centred_rows = False
    lab.prepare_first_centred(allocator, {"q": empty}, {}, {})
    assert seen == [True, False, False]
