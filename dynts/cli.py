"""The ``dynts`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; the
table below names them, and modules are imported only when their subcommand runs (``dynts --help`` stays
fast and optional dependencies stay optional).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dynts.evals.generate_cli", "generate with a DynTSCache from a local HF model"),
    "bench": ("dynts.evals.bench_generate", "full cache vs dynts on a tiny model built from a config"),
    "label": ("dynts.training.predictor.label_cli", "reasoning traces -> importance labels and hidden states (predictor data)"),
    "train-predictor": ("dynts.training.predictor.train_cli", "train the Importance Predictor head on a label directory"),
    "eval": ("dynts.evals.harness", "accuracy and cost of every cache policy on a reasoning dataset (JSONL + plots)"),
    "demo": ("dynts.evals.demo", "the bundled tiny reasoner: full cache vs dynts vs attention baselines at a small budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynts", description="Bounded KV cache for reasoning models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily: only the chosen subcommand's module is imported.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"dynts {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(argv[1:])) or 0)
    parser.parse_args(argv)  # prints help or the error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
