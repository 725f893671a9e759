"""Knowledge distillation for fine-tuning a compressed model (Hinton et al. 2015).

After pruning, the unpruned model is the best guide to what the pruned one
should predict: its full output distribution says more per token than the
one-hot reference. With the `Distillation` loss the pruned model (student) is
trained on a mix of the usual cross-entropy against the labels and the KL
divergence from the teacher's distribution, token by token (word-level
distillation, Kim & Rush 2016):

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)

summed over the positions that carry a label, like every task loss. The
teacher runs forward only (no gradients) on the same batch, through the
task's own `logits`, so any task that defines `logits` can be distilled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.training.loss import IGNORE_INDEX, cross_entropy_sum


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, labelled positions) of the mix above.

    Args:
        student, teacher: (..., C) scores of the same positions; labels (...): ids, -100 = no loss.
        alpha: weight of the teacher term in [0, 1]; 0 is plain cross-entropy.
        temperature: softens both distributions; the T^2 factor keeps the gradient scale.
    """
    hard, n = cross_entropy_sum(student, labels, label_smoothing)
    keep = labels.reshape(-1) != IGNORE_INDEX  # (N,)
    s = student.reshape(-1, student.shape[-1])[keep].float() / temperature  # (n, C)
    t = teacher.reshape(-1, teacher.shape[-1])[keep].float() / temperature  # (n, C)
    soft = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft, n


class Distillation:
    """The trainer's loss (``Trainer(..., loss=Distillation(task, teacher, alpha))``):
    `distillation_loss` of the model's scores against a frozen `teacher`'s on the same batch.

    The task supplies both sides' scores (`Task.logits`), so it works for every task
    that defines them. The teacher follows the batch to its device on first use and
    stays in eval mode.
    """

    def __init__(self, task: Any, teacher: nn.Module, alpha: float, temperature: float = 1.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
        self.task = task
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(iter(batch.values())).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher, _ = self.task.logits(self.teacher, batch)
        student, labels = self.task.logits(model, batch)
        return distillation_loss(student, teacher, labels, self.alpha, self.temperature,
                                 self.task.cfg.train.label_smoothing)
