"""The gain matrix (MATH.md section 3) against an independent, slow reference.

The reference does literally what the gain means: for every pair (i, j) it takes a real SGD
step (autograd, +eta and -eta) on the cross-entropy of the mixed prototype
z = m mu_i + (1 - m) mu_j with label i, moves the confusion matrix's softmax parameters by the
change of the logits at the prototypes, and differentiates the objective by a central
difference. Nothing in it uses the closed form or ``selmix.core.confusion_gradient``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selmix
from selmix import get_objective, list_objectives
from selmix.core import confusion_gradient, gain_matrix

MIX = 0.8
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def soft_min_recall(confusion: torch.Tensor) -> torch.Tensor:
    """A user's objective: a smooth minimum of the recalls."""
    recall = confusion.diagonal() / confusion.sum(dim=1)
    return -torch.logsumexp(-25.0 * recall, dim=0) / 25.0


OBJECTIVES = [*list_objectives(), "user_callable"]


def make_objective(name: str, confusion: torch.Tensor):
    """The objective with its multipliers updated from ``confusion`` (or a raw callable)."""
    if name == "user_callable":
        return soft_min_recall
    objective = get_objective(name)
    objective.update(confusion)
    return objective


def make_problem(num_classes: int, dim: int, bias: bool, seed: int, dtype=F64):
    """A long-tailed confusion matrix with a dominant diagonal, prototypes and a random head."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(num_classes, num_classes, dtype=F64, generator=generator) + 0.05
    rows = rows + 3 * torch.eye(num_classes, dtype=F64)
    rows = rows / rows.sum(dim=1, keepdim=True)
    prior = 0.6 ** torch.arange(num_classes, dtype=F64)  # tail classes are under-covered
    confusion = prior[:, None] * rows
    confusion = confusion / confusion.sum()
    prototypes = 2 * torch.randn(num_classes, dim, dtype=F64, generator=generator)
    head = nn.Linear(dim, num_classes, bias=bias).to(F64)
    with torch.no_grad():
        head.weight.copy_(0.5 * torch.randn(num_classes, dim, dtype=F64, generator=generator))
        if bias:
            head.bias.copy_(torch.randn(num_classes, dtype=F64, generator=generator))
    return confusion, prototypes.to(dtype), head.to(dtype)


def evaluate(objective, confusion: torch.Tensor) -> float:
    return float(objective(confusion))


def reference_gain(objective, confusion, prototypes, head, mix=MIX, eta=2e-5) -> torch.Tensor:
    """G_ref[i, j] = d psi(C') / d eta at eta = 0, pair by pair, with real SGD steps.

    D(h) = (psi(C'_+h) - psi(C'_-h)) / (2 h) is the central difference; its error is
    c h^2 + O(h^4), so the Richardson combination (4 D(eta / 2) - D(eta)) / 3 removes the
    h^2 term and leaves only rounding error (objectives with sharp curvature, such as a
    soft minimum, otherwise need a tolerance as loose as the step).
    """
    num_classes = confusion.shape[0]
    confusion = confusion / confusion.sum()
    prior = confusion.sum(dim=1, keepdim=True)
    log_confusion = confusion.log()
    with torch.no_grad():
        logits = head(prototypes)
    gains = torch.empty(num_classes, num_classes, dtype=F64)
    for i in range(num_classes):
        for j in range(num_classes):
            mixed = mix * prototypes[i] + (1 - mix) * prototypes[j]
            moved = copy.deepcopy(head)
            start = [parameter.detach().clone() for parameter in moved.parameters()]
            loss = F.cross_entropy(moved(mixed[None]), torch.tensor([i]))
            grads = torch.autograd.grad(loss, list(moved.parameters()))

            def psi_after_step(step, moved=moved, start=start, grads=grads):
                with torch.no_grad():
                    parameters = zip(moved.parameters(), start, grads, strict=True)
                    for parameter, value, grad in parameters:
                        parameter.copy_(value - step * grad)  # one SGD step of size `step`
                    new_logits = moved(prototypes)
                    perturbed = prior * torch.softmax(log_confusion + new_logits - logits, dim=1)
                return evaluate(objective, perturbed)

            def central(h):
                return (psi_after_step(h) - psi_after_step(-h)) / (2 * h)

            gains[i, j] = (4 * central(eta / 2) - central(eta)) / 3
    return gains


def softmax_gradient(objective, confusion: torch.Tensor) -> torch.Tensor:
    """d psi(pi_q softmax(A[q])) / dA at A = log C, by torch.func (no closed form)."""
    confusion = (confusion / confusion.sum()).to(F64)
    prior = confusion.sum(dim=1, keepdim=True)

    def psi_of_parameters(parameters: torch.Tensor) -> torch.Tensor:
        return objective(prior * torch.softmax(parameters, dim=1))

    return torch.func.grad(psi_of_parameters)(confusion.log())


def direct_gain(objective, confusion, prototypes, head, mix=MIX) -> torch.Tensor:
    """The direct form of MATH.md section 3, pair by pair in float64 with torch.softmax."""
    grad_a = softmax_gradient(objective, confusion)
    features = prototypes.to(F64)
    weight = head.weight.detach().to(F64)
    logits = features @ weight.T
    beta = 0.0
    if head.bias is not None:
        logits = logits + head.bias.detach().to(F64)
        beta = 1.0
    weights = (features @ features.T + beta) @ grad_a  # H = S g
    num_classes = confusion.shape[0]
    gains = torch.empty(num_classes, num_classes, dtype=F64)
    for i in range(num_classes):
        for j in range(num_classes):
            mixed_weights = mix * weights[i] + (1 - mix) * weights[j]
            probs = torch.softmax(mix * logits[i] + (1 - mix) * logits[j], dim=0)
            gains[i, j] = mixed_weights[i] - (probs * mixed_weights).sum()
    return gains


def assert_gain_close(actual, expected, rtol=1e-4, atol_scale=1e-7):
    scale = float(expected.abs().max())
    assert scale > 1e-6, "degenerate test case: the gain is all zero"
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol_scale * scale), (
        f"max abs diff {float((actual - expected).abs().max()):.3e} (scale {scale:.3e})"
    )


# -- the main check ----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("num_classes", "dim"), [(3, 16), (5, 4), (7, 16)])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_gain_matches_sgd_step_reference(name, num_classes, dim, bias):
    seed = 1000 * OBJECTIVES.index(name) + 10 * num_classes + dim + int(bias)
    confusion, prototypes, head = make_problem(num_classes, dim, bias, seed)
    objective = make_objective(name, confusion)
    multipliers = getattr(objective, "multipliers", None)
    if name.endswith("coverage"):
        assert multipliers.max() > 0  # the coverage constraint is active in this problem
    gains = gain_matrix(objective, confusion, prototypes, head)
    assert gains.shape == (num_classes, num_classes) and gains.dtype == F64
    expected = reference_gain(objective, confusion, prototypes, head)
    assert_gain_close(gains, expected)
    # the gain neither moves the head nor touches the multipliers
    assert head.weight.grad is None
    if multipliers is not None:
        torch.testing.assert_close(objective.multipliers, multipliers, rtol=0, atol=0)


@pytest.mark.parametrize("mix", [0.6, 1.0])
def test_gain_with_another_mix_matches_reference(mix):
    confusion, prototypes, head = make_problem(4, 5, True, seed=77)
    objective = make_objective("h_mean_min_coverage", confusion)
    gains = gain_matrix(objective, confusion, prototypes, head, mix=mix)
    assert_gain_close(gains, reference_gain(objective, confusion, prototypes, head, mix=mix))
    other = gain_matrix(objective, confusion, prototypes, head)  # default m = 0.8
    assert not torch.allclose(other, gains, rtol=1e-3)


def test_gain_accepts_counts_and_a_name():
    confusion, prototypes, head = make_problem(5, 8, True, seed=5)
    counts = torch.round(confusion * 1e5)  # a matrix of counts with the same proportions
    by_name = gain_matrix("mean_recall", counts, prototypes, head)
    by_object = gain_matrix(get_objective("mean_recall"), counts / counts.sum(), prototypes, head)
    torch.testing.assert_close(by_name, by_object, rtol=1e-12, atol=1e-14)
    assert_gain_close(
        by_name, reference_gain(get_objective("mean_recall"), counts, prototypes, head)
    )


# -- the objective's gradient ------------------------------------------------------------------
@pytest.mark.parametrize("name", OBJECTIVES)
def test_confusion_gradient_matches_autograd_through_softmax(name):
    confusion, _, _ = make_problem(6, 2, True, seed=OBJECTIVES.index(name))
    objective = make_objective(name, confusion)
    expected = softmax_gradient(objective, confusion)
    actual = confusion_gradient(objective, confusion)
    assert actual.dtype == F64
    assert float(expected.abs().max()) > 1e-6
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
    # the matrix is normalised inside: counts give the same gradient
    torch.testing.assert_close(
        confusion_gradient(objective, confusion * 1234.5), expected, rtol=1e-10, atol=1e-14
    )
    # rows of d psi / dA sum to zero (a constant shift of A[q] leaves C unchanged)
    torch.testing.assert_close(actual.sum(dim=1), torch.zeros(6, dtype=F64), rtol=0, atol=1e-12)


# -- precision and numerical safety ------------------------------------------------------------
@pytest.mark.parametrize("name", ["mean_recall", "min_recall", "h_mean_min_head_tail_coverage"])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_float32_equals_float64(name, bias):
    confusion, prototypes, head = make_problem(40, 24, bias, seed=9)
    objective = make_objective(name, confusion)
    gains64 = gain_matrix(objective, confusion, prototypes, head)
    head32 = copy.deepcopy(head).float()  # Module.float() converts in place
    gains32 = gain_matrix(objective, confusion.float(), prototypes.float(), head32)
    assert gains32.dtype == torch.float32
    scale = float(gains64.abs().max())
    torch.testing.assert_close(gains32.double(), gains64, rtol=1e-3, atol=1e-5 * scale)
    # and float64 matches the direct (unfactorised) form to rounding error
    direct = direct_gain(objective, confusion, prototypes, head)
    torch.testing.assert_close(gains64, direct, rtol=1e-9, atol=1e-12 * scale)


def huge_logit_problem(bias: bool, weight_scale: float):
    confusion, prototypes, head = make_problem(6, 4, bias, seed=21)
    with torch.no_grad():
        head.weight.mul_(weight_scale)
        if bias:
            head.bias.mul_(100.0)
        logits = head(prototypes)
    return confusion, prototypes, head, logits


def factorised_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """sum_l u[i, l] v[j, l] of MATH.md section 3, without any guard."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return torch.exp(MIX * shifted) @ torch.exp((1 - MIX) * shifted).T


@pytest.mark.parametrize("weight_scale", [300.0, 1000.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["mean_recall", "min_recall", "mean_recall_min_coverage"])
def test_huge_logits_give_finite_exact_gains(name, bias, weight_scale):
    confusion, prototypes, head, logits = huge_logit_problem(bias, weight_scale)
    top2 = logits.topk(2, dim=1).values
    gaps = top2[:, 0] - top2[:, 1]
    spread = logits.max(dim=1).values - logits.min(dim=1).values
    assert float(gaps.max()) > 1000 and float(spread.min()) > 800
    # without a guard the factorised normaliser underflows here (to zero in float32, and to
    # zero or to imprecise subnormals in float64), so the guarded path is exercised
    assert (factorised_normaliser(logits.float()) == 0).any()
    tiny64 = torch.finfo(F64).tiny
    if weight_scale >= 1000:
        assert (factorised_normaliser(logits) == 0).any()
    else:
        assert (factorised_normaliser(logits) < tiny64**0.5).any()

    objective = make_objective(name, confusion)
    expected = direct_gain(objective, confusion, prototypes, head)
    gains = gain_matrix(objective, confusion, prototypes, head)
    assert torch.isfinite(gains).all()
    scale = float(expected.abs().max())
    assert scale > 1e-6
    torch.testing.assert_close(gains, expected, rtol=1e-9, atol=1e-12 * scale)

    head32 = copy.deepcopy(head).float()
    gains32 = gain_matrix(objective, confusion.float(), prototypes.float(), head32)
    assert gains32.dtype == torch.float32 and torch.isfinite(gains32).all()
    torch.testing.assert_close(gains32.double(), expected, rtol=1e-3, atol=1e-4 * scale)


# -- dtype, device ------------------------------------------------------------------------------
def test_output_dtype_follows_the_prototypes():
    confusion, prototypes, head = make_problem(4, 3, True, seed=2)
    as64 = gain_matrix("mean_recall", confusion.float(), prototypes, copy.deepcopy(head).float())
    assert as64.dtype == F64 and as64.device == prototypes.device
    as32 = gain_matrix("mean_recall", confusion, prototypes.float(), head)
    assert as32.dtype == torch.float32
    torch.testing.assert_close(as32.double(), as64, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mean_recall", "min_recall"])
def test_output_device_follows_the_prototypes(name):
    confusion, prototypes, head = make_problem(4, 3, True, seed=2)
    objective = make_objective(name, confusion)  # multipliers computed on the CPU
    on_cpu = gain_matrix(objective, confusion, prototypes, head)
    on_gpu = gain_matrix(objective, confusion, prototypes.cuda(), head.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == F64
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-10, atol=1e-12)


# -- errors --------------------------------------------------------------------------------------
def test_single_class_is_rejected():
    with pytest.raises(ValueError, match="K >= 2"):
        gain_matrix("mean_recall", torch.ones(1, 1), torch.randn(1, 3), nn.Linear(3, 1))


def test_shape_mismatches_name_the_argument():
    confusion, prototypes, head = make_problem(4, 3, True, seed=4)
    with pytest.raises(ValueError, match=r"`prototypes` has 5 rows.*4 x 4"):
        gain_matrix("mean_recall", confusion, torch.randn(5, 3, dtype=F64), head)
    with pytest.raises(ValueError, match=r"`head` has 5 outputs.*4 x 4"):
        gain_matrix("mean_recall", confusion, prototypes, nn.Linear(3, 5).double())
    with pytest.raises(ValueError, match=r"`head` takes 3 features but `prototypes` has 6"):
        gain_matrix("mean_recall", confusion, torch.randn(4, 6, dtype=F64), head)
    with pytest.raises(ValueError, match=r"`prototypes` must be a K x d tensor"):
        gain_matrix("mean_recall", confusion, torch.randn(4, dtype=F64), head)
    with pytest.raises(TypeError, match=r"`head` must be a torch.nn.Linear.*Sequential"):
        gain_matrix("mean_recall", confusion, prototypes, nn.Sequential(head))
    with pytest.raises(ValueError, match=r"`confusion` must be a square"):
        gain_matrix("mean_recall", confusion[:, :3], prototypes, head)
    with pytest.raises(ValueError, match="`prototypes` must be finite"):
        gain_matrix("mean_recall", confusion, prototypes * float("nan"), head)
    with pytest.raises(ValueError, match="`mix`"):
        gain_matrix("mean_recall", confusion, prototypes, head, mix=1.5)


def test_class_absent_from_confusion_is_named():
    confusion, prototypes, head = make_problem(4, 3, True, seed=4)
    confusion = confusion.clone()
    confusion[2] = 0
    with pytest.raises(ValueError, match=r"`confusion` has no samples of class\(es\) \[2\]"):
        gain_matrix("mean_recall", confusion, prototypes, head)


def test_objective_bound_to_another_k_is_rejected():
    confusion, prototypes, head = make_problem(4, 3, True, seed=4)
    objective = make_objective("min_recall", make_problem(5, 3, True, seed=4)[0])
    with pytest.raises(ValueError, match=r"K = 4 classes .* K = 5"):
        gain_matrix(objective, confusion, prototypes, head)


def test_the_gain_ranks_pairs_that_help_the_worst_class():
    """Sanity beyond equality: for min recall, the best pairs carry the worst class's label."""
    confusion, prototypes, head = make_problem(5, 16, True, seed=31)
    objective = make_objective("min_recall", confusion)
    gains = gain_matrix(objective, confusion, prototypes, head).numpy()
    worst = int(np.argmin(np.diag(confusion.numpy()) / confusion.numpy().sum(axis=1)))
    best_row = int(np.unravel_index(np.argmax(gains), gains.shape)[0])
    assert best_row == worst
    assert selmix.core.mixup_distribution(torch.from_numpy(gains))[worst].sum() > 0.5


# -- classes at zero: the soft confusion matrix in the derivative factor -----------------------
def _class_never_predicted() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    """K = 3, class 2 never predicted: hard counts with a zero diagonal entry, soft counts."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    head = nn.Linear(4, 3).double()
    with torch.no_grad():
        head.weight.copy_(prototypes)
        head.weight[2] *= 0.2
        head.bias.copy_(torch.tensor([0.0, 0.0, -3.0]))
    logits = head(prototypes).detach()
    per_class = 50.0
    hard = torch.zeros(3, 3, dtype=torch.float64)
    hard[torch.arange(3), logits.argmax(dim=1)] = per_class
    soft = torch.softmax(logits, dim=1) * per_class
    return hard, soft, prototypes, head


def test_zero_diagonal_entry_gets_positive_gain_with_soft_confusion():
    hard, soft, prototypes, head = _class_never_predicted()
    assert hard[2, 2] == 0 and (soft > 0).all()
    objective = get_objective("min_recall")
    objective.update(hard)
    without = gain_matrix(objective, hard, prototypes, head, 0.8)
    with_soft = gain_matrix(objective, hard, prototypes, head, 0.8, soft_confusion=soft)
    # the hard factor C[2, 2] = 0 hides class 2 from the gain
    assert without[2].max() <= 0
    # the soft factor makes its pairs the ones with the largest, positive gain
    assert with_soft[2].max() > 0
    assert int(with_soft.flatten().argmax()) // 3 == 2
    policy = selmix.core.mixup_distribution(with_soft, scale=3.0, normalize_gain=True)
    assert float(policy[2].sum()) > 0.5


def test_soft_confusion_equal_to_confusion_changes_nothing():
    confusion = torch.tensor([[30.0, 5, 3], [4, 25, 6], [3, 7, 20]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    head = nn.Linear(5, 3).double()
    objective = get_objective("h_mean")
    plain = gain_matrix(objective, confusion, prototypes, head)
    same = gain_matrix(objective, confusion, prototypes, head, soft_confusion=confusion * 7)
    torch.testing.assert_close(plain, same, rtol=1e-12, atol=1e-15)


def test_soft_confusion_is_validated():
    hard, soft, prototypes, head = _class_never_predicted()
    with pytest.raises(ValueError, match="soft_confusion"):
        gain_matrix("min_recall", hard, prototypes, head, soft_confusion=soft[:2, :2])
    with pytest.raises(ValueError, match="soft_confusion"):
        gain_matrix("min_recall", hard, prototypes, head, soft_confusion=-soft)


def test_zero_diagonal_entry_gets_positive_gain_with_pseudo_count():
    """The default estimate (counts + 1 per cell) also makes a never-predicted class visible."""
    hard, _, prototypes, head = _class_never_predicted()
    smoothed = hard + 1.0
    objective = get_objective("min_recall")
    objective.update(smoothed)
    gain = gain_matrix(objective, smoothed, prototypes, head, 0.8)
    assert gain[2].max() > 0
    assert int(gain.flatten().argmax()) // 3 == 2
    policy = selmix.core.mixup_distribution(gain, scale=3.0, normalize_gain=True)
    assert float(policy[2].sum()) > 0.5
