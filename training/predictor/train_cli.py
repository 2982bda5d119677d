"""``dynts train-predictor``: train the Importance Predictor head on a label directory and save it.

    dynts train-predictor --labels labels/ --out ip-head/ [--epochs 15 --lr 5e-4 --batch-size 1024 ...]

The base model is not loaded: the label directory holds its hidden states and its identity, which the saved
head records (``head.json``). Prints one line per epoch and a JSON summary; writes ``OUT/report.json``. The
settings and the label directory are checked before training starts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from dynts.cli import UsageError, default_device, device_name, existing_folder, make_settings
from .dataset import LabelSet
from .labels import NORMALISATIONS
from .train import TrainConfig, train_predictor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--labels", type=existing_folder, required=True, help="label directory written by `dynts label`")
    parser.add_argument("--out", type=Path, required=True, help="directory for head.safetensors, head.json, report.json")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training traces; >= 1")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (cosine schedule); > 0")
    parser.add_argument("--betas", type=float, nargs=2, default=list(defaults.betas), help="AdamW betas, two values in [0, 1)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay; >= 0")
    parser.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction,
                        help="share of the steps spent warming up the learning rate, in [0, 1)")
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="gradient norm clip; > 0")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="tokens per optimiser step; >= 1")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="share of traces held out, in (0, 1)")
    parser.add_argument("--rank-weight", type=float, default=defaults.rank_weight, help="weight of the pairwise rank loss; >= 0")
    parser.add_argument("--normalisation", choices=NORMALISATIONS, default=defaults.normalisation,
                        help="how attention labels become regression targets")
    parser.add_argument("--recall-fraction", type=float, default=defaults.recall_fraction,
                        help="top share of tokens whose recall is reported, in (0, 1]")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split, the initialisation and the batches")
    parser.add_argument("--device", type=device_name, default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in ("betas", "device")}
    config = make_settings(TrainConfig, **values, betas=tuple(args.betas), device=args.device or default_device())
    try:
        labels = LabelSet(args.labels)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--labels {args.labels}: {error}") from error
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    head, report = train_predictor(labels, config, log=lambda message: print(message, flush=True))
    head.save(args.out, labels.identity, extra={
        "labels": labels.settings | {"normalisation": config.normalisation},
        "validation": {"mse": report.final.mse, "recall": report.final.recall, "recall_fraction": config.recall_fraction},
    })
    (args.out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(json.dumps({
        "out": str(args.out), "train_tokens": report.train_tokens, "train_traces": report.train_traces,
        "val_traces": report.final.traces, "val_mse": round(report.final.mse, 5),
        "val_mse_untrained": round(report.initial.mse, 5), "val_mse_mean_baseline": round(report.mean_baseline_mse, 5),
        f"val_recall_top{config.recall_fraction:.0%}": round(report.final.recall, 4),
        "random_recall": config.recall_fraction,
    }))
    return 0
