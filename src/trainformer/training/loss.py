"""The token-level loss every task uses: label-smoothed cross-entropy, summed in fp32.

On the CPU, training computes it with `SoftmaxCrossEntropy`: the gradient
(softmax minus the smoothed target) is written during the forward pass, in the
logits' dtype, by the C kernel `trainformer.nn.native.softmax_xent` (one pass
per row, rows split over torch's threads) where it is built, else by PyTorch
ops on row blocks upcast 128 at a time. Autograd's ``F.cross_entropy`` instead
keeps an fp32 copy of all logits and its log-softmax, and reads them again in
three backward passes (log-softmax, the upcast, the loss); the block version is
2-3x faster on the logits of a recipe's batch and holds half the memory in bf16
(``python benchmarks/speed/bench_loss.py``). Elsewhere (CUDA, no gradient)
``F.cross_entropy`` runs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainformer.data.batching import IGNORE_INDEX  # labels of padding / tokens that carry no loss
from trainformer.nn import native

ROWS_PER_BLOCK = 128  # logits rows upcast at a time: a (128, V) fp32 block stays in cache
BLOCKWISE_ON_CPU = True  # a benchmark switches it off to compare


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy over the tokens whose label is not -100.

    Args:
        logits: (..., V) scores, any float dtype; the softmax statistics are
            computed in fp32, so they are exact enough under bf16/fp16 autocast.
        labels: (...) class ids, -100 where no loss is taken (padding).
        label_smoothing: epsilon of Szegedy et al. 2016 (0 disables).

    Returns:
        (loss_sum, n_tokens): fp32 0-dim tensors. The trainer divides the sum
        of all micro-batches by their total token count.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    n_tokens = (flat_labels != IGNORE_INDEX).sum().float()
    if (BLOCKWISE_ON_CPU and flat_logits.device.type == "cpu" and flat_logits.requires_grad
            and torch.is_grad_enabled()):
        return SoftmaxCrossEntropy.apply(flat_logits, flat_labels, label_smoothing), n_tokens
    loss_sum = F.cross_entropy(
        flat_logits.float(), flat_labels, reduction="sum",
        label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX,
    )
    return loss_sum, n_tokens


class SoftmaxCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=eps,
    ignore_index=-100)`` with its gradient computed in the forward pass, block by block.

    With p = softmax(x) and the smoothed target t = (1 - eps) onehot(label) + eps / V,
    the loss of a row is ``-sum(t * log p)`` and its gradient ``p - t`` (zero for
    ignored rows); only that gradient is kept for backward, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
        if native.xent_takes(logits) and native.available():
            total, grad = native.softmax_xent(logits, labels, eps, IGNORE_INDEX)  # (), (N, V)
        else:
            total, grad = _blockwise(logits, labels, eps)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors  # a second backward (retain_graph) fails here: scaled in place below
        return grad.mul_(grad_out), None, None


def _blockwise(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`SoftmaxCrossEntropy`'s forward in PyTorch ops, `ROWS_PER_BLOCK` rows upcast at a time."""
    grad = torch.empty_like(logits)  # (N, V)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        loss, grad[rows] = _block(logits[rows].float(), labels[rows], eps)
        total += loss
    return total, grad


def _block(x: torch.Tensor, labels: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, V) fp32 logits, labels (R,) -> (summed loss, gradient (R, V) of the summed loss)."""
    vocab = x.shape[1]
    valid = labels != IGNORE_INDEX  # (R,)
    label = labels.clamp_min(0)[:, None]  # (R, 1); ignored rows point at class 0, then are zeroed
    top = x.amax(dim=1, keepdim=True)  # (R, 1)
    p = (x - top).exp_()  # (R, V) unnormalised softmax
    norm = p.sum(dim=1, keepdim=True)  # (R, 1)
    lse = top + norm.log()  # (R, 1) log-sum-exp
    loss = (1.0 - eps) * (lse - x.gather(1, label))  # (R, 1) -log p[label], weighted
    if eps:
        loss = loss + eps * (lse - x.mean(dim=1, keepdim=True))  # -mean(log p), weighted
    p.div_(norm)  # softmax
    if eps:
        p.sub_(eps / vocab)
    p.scatter_add_(1, label, torch.full_like(label, eps - 1.0, dtype=p.dtype))
    p.mul_(valid[:, None])
    return (loss.squeeze(1) * valid).sum(), p
