"""ORPO, SimPO and KTO losses, rewards and gradients against TRL 1.16's own loss methods on
the same log-probs (ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss with loss_type simpo,
KTOTrainer._compute_loss), as tests/train/test_dpo.py does for DPO."""

import functools
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lorakit.train import preference_losses as pl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                      gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)


def _mean_logps(B=5, T=11, seed=0):
    """Per-token log-probs of 2B answers of varying length and their mask; the per-answer
    means (ours) and TRL's get_batch_logps(average_log_prob=True) of the same tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for row in range(2 * B):
        start = 1 + row % 3
        mask[row, start:start + 2 + (row * 7) % (T - start - 1)] = True
    per_token = (-torch.rand(2 * B, T, generator=g) * 2).requires_grad_(True)
    return per_token, mask


def _trl_average(per_token, mask):
    """TRL's get_batch_logps on logits whose log-softmax picks ``per_token``: logits of a
    two-word vocabulary [log p, log(1-p)] and the label 0 where the mask is on."""
    from trl.experimental.cpo import CPOTrainer

    logits = torch.stack([per_token, torch.log1p(-per_token.exp())], dim=-1)  # (R, T, 2)
    # get_batch_logps shifts: labels[:, 1:] are scored by logits[:, :-1]
    labels = torch.full((per_token.shape[0], per_token.shape[1] + 1), -100, dtype=torch.long)
    labels[:, 1:][mask] = 0
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)


def _ours_average(per_token, mask):
    return (per_token * mask).sum(1) / mask.sum(1)


def test_mean_answer_logps_equal_trls_length_normalisation():
    per_token, mask = _mean_logps()
    torch.testing.assert_close(_ours_average(per_token, mask), _trl_average(per_token, mask),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_equals_trl(beta):
    from trl.experimental.orpo import ORPOTrainer

    per_token, mask = _mean_logps(seed=int(beta * 10))
    avg = _ours_average(per_token, mask)
    B = len(avg) // 2
    nll = -(per_token[:B] * mask[:B]).sum() / mask[:B].sum()  # the same NLL term for both
    ours = pl.orpo_loss(avg[:B], avg[B:], beta=beta)
    loss_ours = nll + ours["losses"].mean()
    (g_ours,) = torch.autograd.grad(loss_ours, per_token, retain_graph=True)

    trainer = SimpleNamespace(beta=beta, accelerator=CPU)
    avg_trl = _trl_average(per_token, mask)
    losses, rc, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(trainer, avg_trl[:B], avg_trl[B:])
    loss_trl = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    (g_trl,) = torch.autograd.grad(loss_trl, per_token)
    assert float(loss_ours.detach()) == pytest.approx(float(loss_trl.detach()), abs=1e-6)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-6, rtol=1e-5)
    assert float(g_ours.abs().sum()) > 0
    torch.testing.assert_close(ours["chosen_rewards"], rc.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours["rejected_rewards"], rr.detach(), atol=1e-6, rtol=1e-6)
    assert float(ours["log_odds_ratio"].mean()) == pytest.approx(float(ratio), abs=1e-6)
    assert float(ours["log_odds_chosen"].mean()) == pytest.approx(float(log_odds), abs=1e-6)


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    x = torch.tensor([-1e-3, -0.5, -0.7, -5.0, -10.0], dtype=torch.float64)
    torch.testing.assert_close(pl.log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta, gamma, smoothing", [
    (2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.5, 0.0, 0.0), (2.0, 1.0, 0.1)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma, smoothing):
    from trl.experimental.cpo import CPOTrainer

    per_token, mask = _mean_logps(seed=3)
    avg = _ours_average(per_token, mask)
    B = len(avg) // 2
    ours = pl.simpo_loss(avg[:B], avg[B:], beta=beta, gamma=gamma, label_smoothing=smoothing)
    (g_ours,) = torch.autograd.grad(ours["losses"].mean(), per_token)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo",
                              label_smoothing=smoothing, accelerator=CPU)
    avg_trl = _trl_average(per_token, mask)
    losses, rc, rr = CPOTrainer.cpo_loss(trainer, avg_trl[:B], avg_trl[B:])
    (g_trl,) = torch.autograd.grad(losses.mean(), per_token)
    torch.testing.assert_close(ours["losses"], losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-7, rtol=1e-5)
    assert float(g_ours.abs().sum()) > 0
    torch.testing.assert_close(ours["chosen_rewards"], rc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours["rejected_rewards"], rr, atol=1e-6, rtol=1e-6)


def _trl_kto(per_token, kl_per_token, completion_mask, kl_mask, ref, ref_kl, labels, *, beta,
             desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss itself, with a stand-in for its fused LM head that
    returns the given per-token log-probs (of the batch, or of its mismatched KL rows), and
    precomputed reference log-probs."""
    from trl import KTOTrainer

    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=CPU,
                              precompute_ref_logps=True, calculate_KL=True, loss_type="kto",
                              beta=beta, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                              _tp_size=1, aux_loss_enabled=False)
    trainer._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer)
    R, T = completion_mask.shape
    input_ids = torch.zeros(R, T, dtype=torch.long)
    kl_ids = torch.ones(R, T, dtype=torch.long)

    def model(input_ids, **kwargs):
        logps = kl_per_token if input_ids is kl_ids else per_token
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)

    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta, wd, wu, labels", [
    (0.1, 1.0, 1.0, [True, False, True, True, False, False]),
    (0.5, 1.0, 1.33, [False, True, False, False, True, True]),
    (2.0, 0.8, 1.0, [True, True, False, True, False, True])])
def test_kto_equals_trl(beta, wd, wu, labels):
    g = torch.Generator().manual_seed(7)
    R, T = len(labels), 10
    completion = torch.zeros(R, T, dtype=torch.long)
    kl_completion = torch.zeros(R, T, dtype=torch.long)
    for row in range(R):
        completion[row, 3 + row % 2:3 + row % 2 + 2 + row % 4] = 1
        kl_completion[row, 2 + row % 3:2 + row % 3 + 3 + row % 3] = 1
    per_token = ((-torch.rand(R, T - 1, generator=g) * 3) * completion[:, 1:]).requires_grad_(True)
    kl_per_token = (-torch.rand(R, T - 1, generator=g) * 3) * kl_completion[:, 1:]
    ref = per_token.detach().sum(1) + torch.randn(R, generator=g)  # log-ratios around 0
    ref_kl = kl_per_token.sum(1) - 0.3 + 0.2 * torch.randn(R, generator=g)  # KL estimate > 0
    label_t = torch.tensor(labels)

    kl = pl.kto_kl(kl_per_token.sum(1), ref_kl)
    assert float(kl) > 0
    ours = pl.kto_loss(per_token.sum(1), ref, label_t, kl, beta=beta, desirable_weight=wd,
                       undesirable_weight=wu)
    (g_ours,) = torch.autograd.grad(ours["losses"].mean(), per_token)
    theirs, metrics = _trl_kto(per_token, kl_per_token, completion, kl_completion, ref, ref_kl,
                               label_t, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    (g_trl,) = torch.autograd.grad(theirs, per_token)
    assert float(ours["losses"].mean()) == pytest.approx(float(theirs), abs=1e-6)
    torch.testing.assert_close(g_ours, g_trl, atol=1e-7, rtol=1e-5)
    assert float(g_ours.abs().sum()) > 0
    assert metrics["kl"][-1] == pytest.approx(float(kl), abs=1e-6)
    for key, value in (("rewards/chosen", ours["chosen_rewards"].mean()),
                       ("rewards/rejected", ours["rejected_rewards"].mean()),
                       ("rewards/margins", ours["chosen_rewards"].mean()
                        - ours["rejected_rewards"].mean())):
        assert metrics[key][-1] == pytest.approx(float(value), abs=1e-6), key


def test_kto_reference_point_is_clamped_and_detached():
    logps = torch.tensor([-3.0, -2.0], requires_grad=True)
    kl = pl.kto_kl(logps, torch.tensor([-1.0, -1.0]))
    assert float(kl) == 0.0 and not kl.requires_grad
