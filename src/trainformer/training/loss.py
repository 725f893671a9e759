"""The token-level loss every task uses: label-smoothed cross-entropy, summed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainformer.data.batching import IGNORE_INDEX  # labels of padding / tokens that carry no loss


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy over the tokens whose label is not -100.

    Args:
        logits: (..., V) scores, any float dtype; cast to fp32 so the softmax
            statistics under bf16/fp16 autocast are exact enough.
        labels: (...) class ids, -100 where no loss is taken (padding).
        label_smoothing: epsilon of Szegedy et al. 2016 (0 disables).

    Returns:
        (loss_sum, n_tokens): fp32 0-dim tensors. The trainer divides the sum
        of all micro-batches by their total token count.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    loss_sum = F.cross_entropy(
        flat_logits, flat_labels, reduction="sum",
        label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX,
    )
    n_tokens = (flat_labels != IGNORE_INDEX).sum().float()
    return loss_sum, n_tokens
