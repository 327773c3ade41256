"""Where a class-incremental run's errors on each new task go, right after it trains on it.

Runs ``cl-sulora ARGS`` with a plugin that, after every training experience, watches the
evaluation of that same experience (the accuracy matrix's diagonal) and sorts its test examples
by the predicted class: right, a wrong class of the same task, a class of an earlier task
(counted per earlier task), or a class no task has brought yet. Under class-incremental
inference a low diagonal is either the task learnt badly (errors inside the task) or its
examples taken by the classes of earlier tasks (task confusion); the two call for different
remedies. The file is rewritten after every experience, so a run cut short keeps what it
measured.

    python confusion.py OUT.json run --benchmark long-text --protocol class-incremental ...
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter

import torch
from avalanche.core import SupervisedPlugin

from cl_sulora.runner import cli
from cl_sulora.runner.records import git_commit, versions


class DiagonalConfusion(SupervisedPlugin):
    """Counts, for the experience just trained, its test examples by where they are predicted."""

    def __init__(self, out: str, record: dict):
        super().__init__()
        self.out, self.record = out, record
        self.task_of: dict[int, int] = {}  # class -> index of the experience that brought it
        self.trained = -1
        self.examples = self.right = 0
        self.wrong: Counter = Counter()  # task index (-1: no task yet) -> wrong predictions

    def after_training_exp(self, strategy, **kwargs):
        self.trained = strategy.experience.current_experience
        for label in strategy.experience.classes_in_this_experience:
            self.task_of[int(label)] = self.trained
        self.examples = self.right = 0
        self.wrong = Counter()

    def after_eval_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience != self.trained:
            return
        predicted = strategy.mb_output.argmax(dim=1).cpu()
        truth = strategy.mb_y.cpu()
        self.examples += len(truth)
        self.right += int((predicted == truth).sum())
        self.wrong.update(self.task_of.get(p, -1) for p, y in
                          zip(predicted.tolist(), truth.tolist(), strict=True) if p != y)

    def after_eval(self, strategy, **kwargs):
        if self.trained < 0 or not self.examples:
            return
        n, t = self.examples, self.trained
        earlier = {k: v / n for k, v in self.wrong.items() if k not in (t, -1)}
        self.record["experiences"].append({
            "experience": t, "examples": n, "accuracy": self.right / n,
            "wrong_same_task": self.wrong[t] / n,
            "wrong_earlier_tasks": sum(earlier.values()),
            "wrong_by_task": {str(k): v for k, v in sorted(earlier.items())},
            "wrong_unseen_classes": self.wrong[-1] / n,  # a class no task brought yet
        })
        self.trained = -1
        with open(self.out, "w") as f:
            json.dump(self.record, f, indent=1)


def observe(out: str, argv: list[str], command: list[str] | None = None) -> None:
    """Run ``cl-sulora argv`` with the plugin writing to ``out``; ``command`` is what the record
    names as its command (default: this script's)."""
    command = command or ["python", "confusion.py", out, *argv]
    record = {"command": command, "commit": git_commit(),
              "versions": versions(), "torch_threads": torch.get_num_threads(),
              "experiences": []}
    cli.run = functools.partial(cli.run, plugins=[DiagonalConfusion(out, record)])
    cli.main(argv)


if __name__ == "__main__":
    observe(sys.argv[1], sys.argv[2:])
