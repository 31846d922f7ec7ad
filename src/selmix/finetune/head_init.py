"""Where SelMix's head starts: the model's own, or a re-balanced one (``head_init``).

A head trained with cross-entropy on long-tailed data is biased towards the frequent
classes by about ``log prior``; SelMix moves it a little per step, and from far away it
spends its steps (and its small validation set) on undoing the bias. Two cheap re-balanced
heads are at hand on the same features: post-hoc logit adjustment (the bias shifted by
``-tau log prior``, tau tuned on the validation set for the objective) and cRT (the head
re-trained with class-balanced sampling). ``head_init="auto"`` scores the model's own
head and both candidates on the validation set for the objective
(:func:`selmix.core.selection.objective_score`) and starts from the best; the start the run
selects from (``select="best"``) is then that head. With a ``head_init_tolerance``
(unset: ``select_tolerance``), heads whose min recall is within that many standard errors
of the best one's tie, and the one with the highest mean recall of them starts
(:func:`selmix.core.selection.undominated_index`): post-hoc logit adjustment's tau is tuned on
the same validation set, so its score there is the most optimistic of the three.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selmix.baselines.crt import classifier_retraining
from selmix.baselines.posthoc import posthoc_logit_adjustment
from selmix.core.objectives import Objective
from selmix.core.selection import objective_score, selection_tolerance, undominated_index
from selmix.engine.config import HEAD_INIT
from selmix.engine.views import FrozenFeatures
from selmix.models import ModelSplit, split_model

__all__ = ["HEAD_INIT", "initialise_head"]


def _candidate_heads(
    method: str,
    model: nn.Module,
    split: ModelSplit,
    train: Any,
    val: Any,
    objective: Objective,
    config: Any,
) -> dict[str, tuple[nn.Linear, dict[str, Any]]]:
    """The re-balanced heads to consider, with what each reports."""
    # the baselines import the fine-tuning settings: imported here, not at module level

    heads: dict[str, tuple[nn.Linear, dict[str, Any]]] = {}
    options = {"device": config.device, "features": split.features, "head": split.head}
    if method in ("posthoc_la", "auto"):
        prior = torch.bincount(
            torch.as_tensor(train.labels).long().cpu(), minlength=split.head.out_features
        )
        adjusted = posthoc_logit_adjustment(
            model, prior, val, objective, batch_size=config.eval_batch_size,
            precision=config.precision, **options,
        )  # fmt: skip
        heads["posthoc_la"] = (_head_of(adjusted.model), {"tau": adjusted.tau})
    if method in ("crt", "auto"):
        retrained = classifier_retraining(
            model, train, None, seed=config.seed, eval_batch_size=config.eval_batch_size,
            precision=config.precision, **options,
        )  # fmt: skip
        heads["crt"] = (_head_of(retrained), {})
    return heads


def _head_of(copy_of_model: nn.Module) -> nn.Linear:
    """The linear head of a copy of the run's model."""
    return split_model(copy_of_model).head


def initialise_head(
    method: str,
    model: nn.Module,
    split: ModelSplit,
    train: Any,
    val: Any,
    objective: Objective,
    config: Any,
) -> dict[str, Any]:
    """Puts the head SelMix starts from into ``split.head`` (in place) and says which.

    Args:
        method: one of :data:`HEAD_INIT`: ``"none"`` keeps the model's head,
            ``"posthoc_la"`` / ``"crt"`` take that re-balanced head, ``"auto"`` the best on
            the validation set of the model's own, the post-hoc and the cRT head.
        model: the classifier; ``split`` is its (features, head) split.
        train, val: the training and validation sets.
        objective: the run's objective (the candidates are scored for it).
        config: the run's settings (device, seed, precision, eval_batch_size).

    Returns:
        ``{"head_init": the head chosen ("model", "posthoc_la" or "crt"), "scores": each
        candidate's validation score (its ``to_dict()``), ...}`` plus the chosen tau of
        post-hoc logit adjustment when it was a candidate.
    """
    if method == "none":
        return {"head_init": "model"}
    candidates = _candidate_heads(method, model, split, train, val, objective, config)
    # every candidate is a head on the same features: one pass of the backbone over val,
    # the heads swapped into split.head and scored as the run's first feedback sees them
    view = FrozenFeatures(
        split, torch.device(config.device), batch_size=config.eval_batch_size,
        precision=config.precision,
    )  # fmt: skip

    class_counts: list[torch.Tensor] = []

    def score_of_current_head() -> Any:
        counts = view.evaluate(val, soft=False).counts
        class_counts.append(counts.sum(dim=1))
        return objective_score(objective, counts)

    scores = {}
    if method == "auto":
        scores["model"] = score_of_current_head()
    original = {k: v.detach().clone() for k, v in split.head.state_dict().items()}
    for name, (head, _) in candidates.items():
        split.head.load_state_dict(head.state_dict())
        scores[name] = score_of_current_head()
    # the first of the best wins: the model's own head on a tie; with a tolerance, the
    # undominated one among those tied within the noise
    width = getattr(config, "head_init_tolerance", None)
    if width is None:
        width = getattr(config, "select_tolerance", None) or 0.0
    tolerance = selection_tolerance(objective, class_counts[0], width)
    names = list(scores)
    chosen = (
        names[undominated_index([scores[name] for name in names], tolerance)]
        if method == "auto"
        else method
    )
    if chosen == "model":
        split.head.load_state_dict(original)
    else:
        split.head.load_state_dict(candidates[chosen][0].state_dict())
    report: dict[str, Any] = {
        "head_init": chosen,
        "scores": {name: score.to_dict() for name, score in scores.items()},
    }
    if "posthoc_la" in candidates:
        report["posthoc_tau"] = candidates["posthoc_la"][1]["tau"]
    return report
