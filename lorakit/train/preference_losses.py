r"""The losses of the preference objectives beside DPO (``method: orpo | simpo | kto``).

Each takes answer log-probabilities (summed over the answer tokens, or averaged over them
where the objective is length-normalised) and returns per-example losses and the implicit
rewards that are logged. The definitions are TRL's (1.16), and tests/train/
test_preference_losses.py checks values and gradients against TRL's own loss methods::

    ORPO   (reference-free; a, b = the chosen / rejected answers' *mean* token log-probs)
           log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))
           loss     = NLL(chosen answer tokens) + beta x -log sigmoid(log_odds)   (beta = lambda)
           rewards  = beta x a, beta x b
    SimPO  (reference-free, length-normalised, a margin gamma)
           loss     = -log sigmoid(beta (a - b) - gamma)   (cSimPO label smoothing as cDPO)
           rewards  = beta x a, beta x b
    KTO    (unpaired: each example is desirable or undesirable; summed log-probs)
           r        = log pi(y|x) - log ref(y|x)
           z0       = max(0, mean over mismatched (x_i, y_j) of log pi - log ref), detached
           desirable    w_d (1 - sigmoid(beta (r - z0)))
           undesirable  w_u (1 - sigmoid(beta (z0 - r)))
           rewards  = beta x r
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOG_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of -log 2."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *,
              beta: float) -> dict[str, torch.Tensor]:
    """ORPO's odds-ratio term per pair (the recipe adds the chosen answers' NLL).

    Args:
        chosen_mean_logps, rejected_mean_logps: (B,) mean log-prob per answer token.
        beta: ORPO's lambda, the weight of the odds-ratio term.

    Returns:
        ``losses`` (B,) = ``-beta log sigmoid(log_odds)``, ``chosen_rewards``,
        ``rejected_rewards`` (detached), ``log_odds_ratio`` (B,) = ``log sigmoid(log_odds)``
        and ``log_odds_chosen`` (B,) = ``log_odds`` (both detached, as TRL logs them).
    """
    a, b = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    ratio = F.logsigmoid(log_odds)
    return {"losses": -beta * ratio, "chosen_rewards": beta * a.detach(),
            "rejected_rewards": beta * b.detach(), "log_odds_ratio": ratio.detach(),
            "log_odds_chosen": log_odds.detach()}


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *,
               beta: float, gamma: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """SimPO per pair: ``-log sigmoid(beta (a - b) - gamma)`` on mean token log-probs.

    Args:
        chosen_mean_logps, rejected_mean_logps: (B,) mean log-prob per answer token.
        beta: the reward scale; gamma: the target reward margin (``simpo_gamma``).
        label_smoothing: the share of pairs assumed mislabelled (as cDPO).

    Returns:
        ``losses`` (B,), ``chosen_rewards`` and ``rejected_rewards`` (B,, detached).
    """
    a, b = chosen_mean_logps.float(), rejected_mean_logps.float()
    logits = (a - b) - gamma / beta
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    return {"losses": losses, "chosen_rewards": beta * a.detach(),
            "rejected_rewards": beta * b.detach()}


def kto_kl(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch's mean log-ratio on mismatched (prompt, answer)
    pairs, detached and clamped at 0 (a scalar)."""
    return (mismatched_logps.float() - ref_mismatched_logps.float()).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """KTO per example.

    Args:
        logps, ref_logps: (N,) summed answer log-probs under the policy and the reference.
        labels: (N,) bool, True for a desirable answer.
        kl: the reference point from :func:`kto_kl` (a detached scalar).
        beta: the reward scale; desirable_weight / undesirable_weight: TRL's loss weights.

    Returns:
        ``losses`` (N,) (weighted, in the examples' order), ``rewards`` (N,, detached: beta
        x log-ratio), ``chosen_rewards`` / ``rejected_rewards`` (the desirable / undesirable
        examples' rewards).
    """
    labels = labels.bool()
    logratios = logps.float() - ref_logps.float()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    rewards = beta * logratios.detach()
    return {"losses": torch.where(labels, desirable, undesirable), "rewards": rewards,
            "chosen_rewards": rewards[labels], "rejected_rewards": rewards[~labels]}
