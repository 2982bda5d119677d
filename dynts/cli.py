"""The ``dynts`` command line, and what its commands share.

Every command is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``: the ``dynts``
subcommands are listed in ``COMMANDS``; the benchmarks and analyses in ``SCRIPTS`` run as ``python -m MODULE``,
whose ``__main__`` block calls ``run_module``. Both go through one runner, which

- builds the parser (help text on every option, ``--debug`` added to every command) and imports a command's
  module only when it runs, so ``dynts --help`` stays fast and optional dependencies stay optional;
- turns a ``UsageError`` (a bad setting or input, raised by a command before it loads a model or starts any
  work) and argparse's own errors into one line, ``<prog>: error: <what>``, exit status 2; any other error is one
  line too, exit status 1, and ``--debug`` shows the full traceback instead.

The helpers below (option types, ``--model`` / ``--predictor`` resolution, model loading, settings built from
options) are shared by the commands so that each check is written once.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from . import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dynts.evals.demo", "the bundled tiny reasoner: full cache vs dynts vs attention baselines at a small budget"),
    "generate": ("dynts.evals.generate_cli", "generate with a DynTSCache from a local HF model (or the bundled one)"),
    "eval": ("dynts.evals.harness", "accuracy and cost of every cache policy on a reasoning dataset (JSONL + plots)"),
    "bench": ("dynts.evals.bench_generate", "full cache vs dynts speed and memory on a tiny model built from a config"),
    "label": ("dynts.training.predictor.label_cli", "reasoning traces -> importance labels and hidden states (predictor data)"),
    "train-predictor": ("dynts.training.predictor.train_cli", "train the Importance Predictor head on a label directory"),
}

# ``python -m MODULE`` commands (same convention, no dynts subcommand) -> one-line help.
SCRIPTS: dict[str, str] = {
    "dynts.evals.bench_decode": "GPU: plain HF vs dynts (StaticDecoder) decode speed at 8B shapes",
    "dynts.evals.plots": "tables and plots of dynts eval results, merging a sweep split over several runs",
    "dynts.evals.bench_kernels": "GPU: compaction bandwidth, attention-score kernel vs torch, predictor MLP",
    "dynts.evals.bench_linear_attention": "GPU: KDA / Gated DeltaNet kernels vs fla, hybrid-model decode TPOT",
    "dynts.evals.bench_predictor": "decode time with the Importance Predictor vs a free scorer",
    "dynts.training.predictor.shift": "predictor recall on hidden states from a run with eviction vs a full cache",
    "dynts.training.reasoner": "train the bundled tiny reasoner on the synthetic task families (GPU)",
}

BUNDLED = "bundled"
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_USAGE = 2  # argparse's status for a bad command line; used for every bad setting or input
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad setting or input: reported as one line naming the option (or the file and line), the value given and
    what is allowed. Commands raise it before loading a model or doing any work."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstrings' layout and appends a meaningful default to each option's help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default is not argparse.SUPPRESS and "%(default)" not in help_text
        if shown and action.option_strings and not isinstance(action, argparse.BooleanOptionalAction):
            help_text += " (default: %(default)s)"
        return help_text


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become ``UsageError`` (one line, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ------------------------------------------------------------------------------------------------ runner


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dynts`` entry point: ``dynts COMMAND [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module_name, summary = COMMANDS[argv[0]]
        return _run(module_name, argv[1:], prog=f"dynts {argv[0]}", summary=summary)
    parser = _top_parser()
    try:
        parser.parse_args(argv)  # --help and --version exit here; anything else names a missing or unknown command
    except UsageError as error:
        _report("dynts", str(error))
    return EXIT_USAGE


def run_module(module_name: str, argv: Sequence[str] | None = None) -> int:
    """Run a command module as ``python -m module_name`` does (its ``__main__`` block calls this); returns the
    exit status. Also the way to run a ``SCRIPTS`` command in-process (tests)."""
    return _run(module_name, list(sys.argv[1:] if argv is None else argv), prog=f"python -m {module_name}",
                summary=SCRIPTS.get(module_name, ""))


def command_parser(module: ModuleType, prog: str, summary: str = "") -> CommandParser:
    """The full parser of a command module: its options plus ``--debug``."""
    parser = CommandParser(prog=prog, description=module.__doc__ or summary, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    return parser


def _top_parser() -> CommandParser:
    parser = CommandParser(
        prog="dynts", description="Bounded KV cache for reasoning models: evict unimportant thinking tokens while decoding.",
        epilog="also, with the same conventions:\n" + "\n".join(f"  python -m {name}\n      {text}" for name, text in SCRIPTS.items()),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dynts {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       help="run `dynts COMMAND --help` for its options")
    for name, (_, summary) in COMMANDS.items():
        subparsers.add_parser(name, help=summary)  # listed for --help; the real parser is built when it runs
    return parser


def _run(module_name: str, argv: list[str], prog: str, summary: str) -> int:
    # Known before parsing, so that a parse error can be shown with its traceback too.
    debug = "--debug" in argv
    try:
        module = _command_module(module_name)
        args = command_parser(module, prog, summary).parse_args(argv)
        return int(module.run(args) or 0)
    except UsageError as error:
        if debug:
            raise
        _report(prog, str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report(prog, "interrupted")
        return 130
    except Exception as error:  # a failure while working: one line unless --debug
        if debug:
            raise
        _report(prog, f"{type(error).__name__}: {error} (run again with --debug for the traceback)")
        return EXIT_FAILURE


def _command_module(module_name: str) -> ModuleType:
    main_module = sys.modules.get("__main__")
    if getattr(getattr(main_module, "__spec__", None), "name", None) == module_name:
        return main_module  # `python -m module_name`: the module is already running as __main__; do not import a copy
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and not error.name.startswith("dynts"):
            raise UsageError(f"this command needs the Python package {error.name!r}, which is not installed (optional "
                             "dependencies: pip install 'dynts[eval]' for eval, demo and plots, 'dynts[triton]' for "
                             "the kernels)") from error
        raise


def _report(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ option types


def positive_int(text: str) -> int:
    return _bounded(text, int, lambda value: value >= 1, "an int >= 1")


def non_negative_int(text: str) -> int:
    return _bounded(text, int, lambda value: value >= 0, "an int >= 0")


def positive_float(text: str) -> float:
    return _bounded(text, float, lambda value: value > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    return _bounded(text, float, lambda value: value >= 0, "a number >= 0")


def unit_fraction(text: str) -> float:
    """A share in (0, 1] (keep ratios, budget fractions, top-p)."""
    return _bounded(text, float, lambda value: 0 < value <= 1, "a number in (0, 1]")


T = TypeVar("T")


def _bounded(text: str, kind: Callable[[str], T], ok: Callable[[T], bool], allowed: str) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
    if value != value or not ok(value):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"{text} is not allowed: must be {allowed}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def model_folder(text: str) -> Path:
    """``--model``: ``bundled`` (the package's tiny reasoner) or a local folder holding an HF model's config.json."""
    if text == BUNDLED:
        from .evals.synthetic_task import bundled_reasoner_path

        return bundled_reasoner_path()
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: no such folder; pass a local model folder (config, weights, tokenizer; fetch a hub model first, "
            f"e.g. `hf download ORG/NAME --local-dir DIR`) or '{BUNDLED}'"
        )
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: has no config.json, so it is not a Hugging Face model folder")
    return path


def device_name(text: str) -> str:
    """``--device``: a torch device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------- shared options

MODEL_HELP = (f"local Hugging Face model folder (config.json, weights, tokenizer), or '{BUNDLED}': the package's "
              "3.6M-parameter tiny reasoner on the synthetic task")


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--model``, ``--device``, ``--dtype``: the options of every command that loads a model."""
    parser.add_argument("--model", type=model_folder, default=default, required=default is None, help=MODEL_HELP)
    parser.add_argument("--device", type=device_name, default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the model weights; auto: bfloat16 on CUDA, float32 on CPU")


def is_bundled(model_dir: Path) -> bool:
    """Whether ``model_dir`` is the package's tiny reasoner (``--model bundled`` or its path)."""
    from .evals.synthetic_task import bundled_reasoner_path

    return model_dir.resolve() == bundled_reasoner_path().resolve()


def model_label(model_dir: Path) -> str:
    """How results name the model: ``bundled``, or the folder as given."""
    return BUNDLED if is_bundled(model_dir) else str(model_dir)


def shipped_predictor(model_dir: Path) -> Path | None:
    """The predictor head shipped with the bundled reasoner when ``model_dir`` is that model, else None."""
    head = model_dir / "predictor"
    return head if is_bundled(model_dir) and head.is_dir() else None


def make_settings(factory: Callable[..., T], names: dict[str, str] | None = None, **values: Any) -> T:
    """``factory(**values)`` (a validated settings class such as ``CompressionConfig``), with its ValueError or
    TypeError turned into a UsageError whose field names read as the options (``keep_ratio`` -> ``--keep-ratio``;
    ``names`` overrides that for fields that no option sets directly)."""
    try:
        return factory(**values)
    except (TypeError, ValueError) as error:
        spelled = {field: "--" + field.replace("_", "-") for field in values} | (names or {})
        message = str(error)
        for field in sorted(spelled, key=len, reverse=True):
            message = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", spelled[field], message)
        raise UsageError(message) from error


def read_predictor(path: Path, model_dir: Path, option: str = "--predictor") -> tuple[Any, Any]:
    """A saved predictor head and the identity of its base model, checked against the model folder's config (sizes
    and type) without loading the model. After the model loads, ``check_predictor_fits`` compares weights."""
    from transformers import AutoConfig

    from .predictor.head import ImportancePredictor

    try:
        head, identity = ImportancePredictor.load_with_identity(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path}: {error}") from error
    config = AutoConfig.from_pretrained(model_dir).get_text_config(decoder=True)
    model_sizes = {"model_type": getattr(config, "model_type", ""), "hidden_size": config.hidden_size,
                   "num_layers": config.num_hidden_layers, "vocab_size": config.vocab_size}
    for attribute, found in model_sizes.items():
        if getattr(identity, attribute) != found:
            raise UsageError(
                f"{option} {path}: the head was trained on {identity.name or 'another model'} with {attribute} "
                f"{getattr(identity, attribute)}; --model {model_dir} has {attribute} {found}: train a head for this model"
            )
    return head, identity


def check_predictor_fits(identity: Any, model: Any, path: Path, option: str = "--predictor") -> None:
    """The weight fingerprint check of ``read_predictor``'s head against the loaded model."""
    try:
        identity.check_compatible(model, what=f"{option} {path}")
    except ValueError as error:
        raise UsageError(str(error)) from error


def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's tokenizer, left-padded (decoder batches), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(model: str | Path, device: str | None = None, dtype: str | None = None, attn: str = "sdpa",
               tokenizer: Any = None) -> tuple[Any, Any]:
    """A local HF causal LM (``bundled``: the tiny reasoner) in eval mode, and its tokenizer (``load_tokenizer``,
    unless one is given). dtype None or ``auto``: bfloat16 on CUDA, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        path = model if isinstance(model, Path) else model_folder(model)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"--model {error}") from error
    device = device or default_device()
    if dtype in (None, "auto"):
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn).to(device).eval()
    return loaded, tokenizer


def think_end_ids(tokenizer: Any, text: str, option: str = "--think-end") -> tuple[int, ...]:
    """The token ids of the end-of-thinking marker ``text``, or a UsageError naming the option."""
    from .config import resolve_think_end

    try:
        return resolve_think_end(tokenizer, text)
    except ValueError as error:
        raise UsageError(f"{option} {text!r}: {error}") from error


def read_jsonl(path: Path, option: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line; a bad line is a UsageError naming file and line."""
    from .evals.datasets import read_jsonl as read

    try:
        return read(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {error}") from error


def chat_template_choice(tokenizer: Any, wanted: bool | None, option: str = "--chat-template") -> bool:
    """Whether to wrap prompts in the tokenizer's chat template: ``wanted``, or (None) when it has one."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if wanted and not has_template:
        raise UsageError(f"{option}: the tokenizer has no chat template")
    return has_template if wanted is None else wanted


if __name__ == "__main__":
    # `python -m dynts.cli`: run the imported module, whose UsageError is the one the commands raise.
    from dynts.cli import main as package_main

    sys.exit(package_main())
