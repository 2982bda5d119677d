"""Training the Importance Predictor head on a label set (the base model stays frozen and is not even loaded).

The hidden states and labels were computed once by ``dynts label``; each epoch reads them again from the
shards. Loss: MSE between the head's score and the normalised label (``labels.normalise``), plus optionally a
pairwise logistic rank loss. AdamW, linear warm-up then cosine decay, gradient clipping; defaults follow the
DynTS reference (lr 5e-4, betas (0.9, 0.95), weight decay 0.01, 10% warm-up, clip 1.0, 15 epochs).

A held-out set of whole traces (``val_fraction``) is scored after every epoch: MSE, and the top-30% recall
(per trace, the share of its true top-30% thinking tokens inside the predicted top-30%, averaged over the
traces; random scores give 0.30).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .dataset import LabelSet
from dynts.predictor.head import ImportancePredictor
from .labels import NORMALISATIONS, normalise

LABEL_FIELDS = ("attention", "uniform", "trace")  # every column but the hidden states


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 1024  # tokens per optimiser step
    val_fraction: float = 0.1
    rank_weight: float = 0.0
    normalisation: str = "log_uniform"
    recall_fraction: float = 0.3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip > 0, "rank_weight": self.rank_weight >= 0,
            "warmup_fraction": 0.0 <= self.warmup_fraction < 1.0, "val_fraction": 0.0 < self.val_fraction < 1.0,
            "recall_fraction": 0.0 < self.recall_fraction <= 1.0,
            "betas": len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas),
        }
        allowed = {
            "epochs": ">= 1", "lr": "> 0", "batch_size": ">= 1", "weight_decay": ">= 0", "grad_clip": "> 0",
            "rank_weight": ">= 0", "warmup_fraction": "in [0, 1)", "val_fraction": "in (0, 1)",
            "recall_fraction": "in (0, 1]", "betas": "two values in [0, 1)",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {allowed[name]}, got {getattr(self, name)!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")


@dataclass
class Evaluation:
    mse: float
    recall: float  # mean over traces of the top-``recall_fraction`` recall
    traces: int
    tokens: int


@dataclass
class TrainReport:
    initial: Evaluation  # the untrained head
    final: Evaluation
    mean_baseline_mse: float  # validation MSE of always predicting the mean training target
    random_recall: float  # expected recall of random scores (= recall_fraction)
    train_tokens: int
    train_traces: int
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recall_at(predicted: torch.Tensor, target: torch.Tensor, fraction: float = 0.3) -> float:
    """Share of the true top-``fraction`` tokens inside the predicted top-``fraction`` (k = ceil(f * n) of n)."""
    if predicted.shape != target.shape or predicted.dim() != 1:
        raise ValueError(f"predicted and target must be equal-length vectors, got {tuple(predicted.shape)} and {tuple(target.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if predicted.numel() == 0:
        raise ValueError("recall_at needs at least one token")
    k = max(1, math.ceil(fraction * predicted.numel()))
    true_top = torch.topk(target.double(), k).indices
    predicted_top = torch.topk(predicted.double(), k).indices
    return float(torch.isin(true_top, predicted_top).sum()) / k


def split_traces(trace_ids: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """The held-out trace ids: a seeded random ``val_fraction`` of them (at least one, at most all but one)."""
    count = trace_ids.numel()
    if count < 2:
        raise ValueError(f"a validation split needs at least 2 labelled traces, got {count}")
    held_out = min(count - 1, max(1, round(val_fraction * count)))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return trace_ids[order[:held_out]].sort().values


def _targets(shard: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    return normalise(shard["attention"], shard["uniform"], shard["trace"], method)


def _predict(head: ImportancePredictor, hidden: torch.Tensor, device: str, chunk: int = 8192) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([head(hidden[i : i + chunk].to(device).float()).cpu() for i in range(0, hidden.shape[0], chunk)])


def evaluate(head: ImportancePredictor, labels: LabelSet, held_out: torch.Tensor, config: TrainConfig) -> Evaluation:
    """MSE and mean per-trace recall of ``head`` on the traces ``held_out``."""
    squared, tokens, recalls = 0.0, 0, []
    head.eval()
    for shard in labels.iter_shards():
        rows = torch.isin(shard["trace"], held_out)
        if not bool(rows.any()):
            continue
        target = _targets(shard, config.normalisation)[rows]
        trace = shard["trace"][rows]
        predicted = _predict(head, shard["hidden"][rows], config.device)
        squared += float(((predicted - target) ** 2).sum())
        tokens += target.numel()
        for index in torch.unique(trace).tolist():
            members = trace == index
            recalls.append(recall_at(predicted[members], target[members], config.recall_fraction))
    if not tokens:
        raise ValueError("the validation split holds no labelled token")
    return Evaluation(mse=squared / tokens, recall=sum(recalls) / len(recalls), traces=len(recalls), tokens=tokens)


def _rank_loss(scores: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pairwise logistic loss on random pairs of the batch: the higher-labelled token should score higher."""
    partner = torch.randperm(scores.numel(), generator=generator).to(scores.device)
    sign = torch.sign(target - target[partner])
    pairs = sign != 0
    if not bool(pairs.any()):
        return scores.sum() * 0.0
    return F.softplus(-sign[pairs] * (scores - scores[partner])[pairs]).mean()


def train_predictor(
    labels: LabelSet,
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = None,
) -> tuple[ImportancePredictor, TrainReport]:
    """Train a fresh head on ``labels``; returns it (on the CPU, float32) and its report."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    held_out = split_traces(labels.trace_ids(), config.val_fraction, config.seed)
    head = ImportancePredictor(labels.hidden_size).to(config.device)

    # One pass over the trace columns: training token counts and the mean target (the constant baseline).
    steps_per_epoch, train_tokens, train_traces, target_sum = 0, 0, set(), 0.0
    for shard in labels.iter_shards(LABEL_FIELDS):
        rows = ~torch.isin(shard["trace"], held_out)
        count = int(rows.sum())
        steps_per_epoch += math.ceil(count / config.batch_size)
        train_tokens += count
        train_traces.update(shard["trace"][rows].tolist())
        target_sum += float(_targets(shard, config.normalisation)[rows].sum())
    if not train_tokens:
        raise ValueError("the training split holds no labelled token")
    mean_target = target_sum / train_tokens

    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    schedule = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)
    generator = torch.Generator().manual_seed(config.seed)

    initial = evaluate(head, labels, held_out, config)
    baseline = _constant_mse(labels, held_out, config, mean_target)
    history = []
    for epoch in range(config.epochs):
        head.train()
        loss_sum, loss_count = 0.0, 0
        for shard_index in torch.randperm(len(labels.shards), generator=generator).tolist():
            shard = labels.shard(shard_index)
            rows = (~torch.isin(shard["trace"], held_out)).nonzero().view(-1)
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
            targets = _targets(shard, config.normalisation)
            for start in range(0, rows.numel(), config.batch_size):
                batch = rows[start : start + config.batch_size]
                hidden = shard["hidden"][batch].to(config.device).float()
                target = targets[batch].to(config.device)
                scores = head(hidden)
                loss = F.mse_loss(scores, target)
                if config.rank_weight:
                    loss = loss + config.rank_weight * _rank_loss(scores, target, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
                optimizer.step()
                schedule.step()
                loss_sum += float(loss.detach()) * batch.numel()
                loss_count += batch.numel()
        result = evaluate(head, labels, held_out, config)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / loss_count, "val_mse": result.mse, "val_recall": result.recall})
        if log is not None:
            log(f"epoch {epoch + 1}/{config.epochs}: train loss {loss_sum / loss_count:.4f}, val MSE {result.mse:.4f}, "
                f"val top-{config.recall_fraction:.0%} recall {result.recall:.3f}")
    report = TrainReport(
        initial=initial, final=result, mean_baseline_mse=baseline, random_recall=config.recall_fraction,
        train_tokens=train_tokens, train_traces=len(train_traces), history=history, config=asdict(config),
    )
    return head.cpu().eval(), report


def _constant_mse(labels: LabelSet, held_out: torch.Tensor, config: TrainConfig, value: float) -> float:
    squared, tokens = 0.0, 0
    for shard in labels.iter_shards(LABEL_FIELDS):
        rows = torch.isin(shard["trace"], held_out)
        target = _targets(shard, config.normalisation)[rows]
        squared += float(((target - value) ** 2).sum())
        tokens += target.numel()
    return squared / tokens
