"""The command line: every bad setting or input is one line naming the option (or the file and line), exit status 2,
before any model is built; help on every option; interleaved bench timings; the README's command lines run."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import statistics
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import transformers

from dynts.cli import COMMANDS, SCRIPTS, UsageError, command_parser, main, run_module
from dynts.evals.synthetic_task import TaskConfig, bundled_reasoner_path, generate_problems

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_FILES = REPO / "tests" / "evals" / "data"  # the first records of math500 and aime24
SHIPPED_HEAD = str(bundled_reasoner_path() / "predictor")


@pytest.fixture
def model_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models built while a test runs (from_pretrained and from a config both go through this constructor);
    each build fails, so a test that expects an error before any model sees the build too."""
    builds: list[str] = []

    def refuse(self, *args, **kwargs) -> None:
        builds.append(type(self).__name__)
        raise RuntimeError("a model was built")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    return builds


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Input files and folders for the bad-input cases, by placeholder name."""
    bad_data = tmp_path / "bad-data"
    bad_data.mkdir()
    (bad_data / "math500.jsonl").write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "answer": 4\n')
    (tmp_path / "questions.jsonl").write_text('{"problem": "a 3", "answer": "1"}\n{"problem": "b 4" "answer": "2"}\n')
    (tmp_path / "other-field.jsonl").write_text('{"question": "a 3", "answer": "1"}\n')
    other_model = tmp_path / "other-model"
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).save_pretrained(other_model)
    return {"tmp": str(tmp_path), "bad_data": str(bad_data), "questions": str(tmp_path / "questions.jsonl"),
            "other_field": str(tmp_path / "other-field.jsonl"), "other_model": str(other_model),
            "shipped_head": SHIPPED_HEAD, "benchmark_files": str(BENCHMARK_FILES)}


GENERATE = ["generate", "--model", "bundled", "--prompt", "a 3 + b 7 <think>"]
# (arguments of `dynts`, what the error line must name)
BAD_INPUTS = [
    (GENERATE + ["--budget", "-5"], ["--budget", "-5"]),
    (GENERATE + ["--budget", "100", "--window", "100"], ["--budget", "--window", "100"]),
    (GENERATE + ["--keep-ratio", "1.5"], ["--keep-ratio", "1.5", "(0, 1]"]),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], ["--model", "/nonexistent", "bundled"]),
    (GENERATE + ["--scorer", "external"], ["--scorer", "external", "h2o"]),
    (GENERATE + ["--predictor", "{tmp}/missing-head"], ["--predictor", "missing-head", "head.json"]),
    (GENERATE + ["--scorer", "h2o", "--predictor", "{shipped_head}"], ["--predictor", "--scorer h2o"]),
    (GENERATE + ["--think-end", "</nothink>"], ["--think-end", "</nothink>"]),
    (["generate", "--model", "{other_model}", "--prompt", "x", "--predictor", "{shipped_head}"], ["--predictor", "hidden_size"]),
    (["generate", "--model", "{other_model}", "--prompt", "x", "--scorer", "predictor"], ["--scorer predictor", "--predictor"]),
    (["bench", "--budget", "-5"], ["--budget", "-5"]),
    (["bench", "--budget", "64", "--window", "64"], ["--budget", "--window", "64"]),
    (["bench", "--keep-ratio", "1.5"], ["--keep-ratio", "1.5"]),
    (["bench", "--heads", "7"], ["--hidden-size", "--heads 7"]),
    (["bench", "--scorer", "external"], ["--scorer", "external"]),
    (["eval", "--budget", "-5"], ["--budget", "-5"]),
    (["eval", "--budget", "64", "--window", "64"], ["--budget", "--window", "64"]),
    (["eval", "--budget", "100", "--keep-ratio", "1.5"], ["--keep-ratio", "1.5"]),
    (["eval", "--model", "/nonexistent"], ["--model", "/nonexistent"]),
    (["eval", "--dataset", "math500", "--data-dir", "{bad_data}", "--methods", "full"], ["math500.jsonl:2", "JSON"]),
    (["eval", "--dataset", "math500", "--data-dir", "{tmp}", "--methods", "full"], ["math500.jsonl", "{tmp}"]),
    (["eval", "--methods", "full,nope"], ["--methods", "nope", "h2o"]),
    (["eval", "--dataset", "math500", "--methods", "full,oracle"], ["--methods", "oracle", "synthetic"]),
    (["eval", "--model", "{other_model}", "--methods", "predictor", "--budget", "100"], ["predictor", "--predictor"]),
    (["eval", "--methods", "predictor", "--budget", "100", "--predictor", "{tmp}/missing-head"], ["--predictor", "missing-head"]),
    (["eval", "--methods", "h2o"], ["h2o", "--budget"]),
    (["eval", "--limit", "2", "--budget-fraction", "0.05"], ["--budget-fraction 0.05", "--window", "64"]),
    (["eval", "--dataset", "math500", "--data-dir", "{benchmark_files}", "--budget-fraction", "0.01", "--window", "100",
      "--max-new-tokens", "1000"], ["--budget-fraction 0.01", "--window 100"]),
    (["eval", "--methods", "full", "--samples", "2"], ["--samples", "--do-sample"]),
    (["eval", "--methods", "snapkv", "--budget", "100", "--window", "16"], ["snapkv", "--window 16"]),
    (["demo", "--keep-ratio", "1.5"], ["--keep-ratio", "1.5"]),
    (["demo", "--budget-fraction", "0.01"], ["--budget-fraction 0.01", "--window"]),
    (["demo", "--predictor", "{tmp}/missing-head"], ["--predictor", "missing-head"]),
    (["demo", "--methods", "window,nope"], ["--methods", "nope"]),
    (["label", "--model", "bundled", "--data", "{questions}", "--out", "{tmp}/labels"], ["questions.jsonl:2", "JSON"]),
    (["label", "--model", "bundled", "--traces", "{questions}", "--out", "{tmp}/labels"], ["--traces", "questions.jsonl:2"]),
    (["label", "--model", "bundled", "--data", "{other_field}", "--out", "{tmp}/labels"], ["--question-field", "other-field.jsonl", "record 1"]),
    (["label", "--model", "bundled", "--synthetic", "2", "--mode", "future", "--out", "{tmp}/labels"], ["--mode future", "--horizon"]),
    (["label", "--model", "/nonexistent", "--synthetic", "2", "--out", "{tmp}/labels"], ["--model", "/nonexistent"]),
    (["train-predictor", "--labels", "{tmp}/missing", "--out", "{tmp}/head"], ["--labels", "missing"]),
    (["train-predictor", "--labels", "{tmp}", "--out", "{tmp}/head"], ["--labels", "labels.json"]),
    (["train-predictor", "--labels", "{tmp}", "--out", "{tmp}/head", "--lr", "0"], ["--lr", "0"]),
    (["nope"], ["COMMAND", "nope", "generate"]),
    ([], ["COMMAND"]),
]
# (module run as `python -m`, its arguments, what the error line must name)
BAD_SCRIPT_INPUTS = [
    ("dynts.training.predictor.shift", ["--model", "bundled", "--synthetic", "1", "--budget", "10", "--window", "10"], ["--budget", "--window"]),
    ("dynts.training.predictor.shift", ["--model", "{other_model}", "--synthetic", "1", "--budget", "100", "--window", "10"], ["--predictor"]),
    ("dynts.evals.bench_predictor", ["--keep-ratio", "1.5"], ["--keep-ratio", "1.5"]),
    ("dynts.evals.bench_linear_attention", ["--parts", "accuracy,nope"], ["--parts", "nope", "tpot"]),
]


def _filled(words: list[str], files: dict[str, str]) -> list[str]:
    return [word.format(**files) for word in words]


def _one_line_error(stderr: str, prog: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("arguments, named", BAD_INPUTS, ids=[" ".join(args) or "(none)" for args, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_it_before_any_model(arguments, named, files, model_builds, capsys, monkeypatch) -> None:
    monkeypatch.chdir(files["tmp"])
    assert main(_filled(arguments, files)) == 2
    prog = f"dynts {arguments[0]}" if arguments and arguments[0] in COMMANDS else "dynts"
    line = _one_line_error(capsys.readouterr().err, prog)
    for text in _filled(named, files):
        assert text in line
    assert model_builds == []


@pytest.mark.parametrize("module, arguments, named", BAD_SCRIPT_INPUTS, ids=[m.rsplit(".", 1)[1] for m, _, _ in BAD_SCRIPT_INPUTS])
def test_bad_script_input_is_one_line_naming_it_before_any_model(module, arguments, named, files, model_builds, capsys) -> None:
    assert run_module(module, _filled(arguments, files)) == 2
    line = _one_line_error(capsys.readouterr().err, f"python -m {module}")
    for text in _filled(named, files):
        assert text in line
    assert model_builds == []


def test_debug_shows_the_traceback_instead(model_builds) -> None:
    with pytest.raises(UsageError, match="--keep-ratio"):
        main([*GENERATE, "--keep-ratio", "1.5", "--debug"])
    with pytest.raises(UsageError, match="invalid choice: 'external'"):
        main([*GENERATE, "--scorer", "external", "--debug"])


def test_an_unexpected_failure_is_one_line_too_and_debug_raises_it(monkeypatch, capsys) -> None:
    command = types.ModuleType("broken_command")
    command.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1, help="a size")

    def run(args) -> int:
        raise RuntimeError("disk full\nwhile writing")

    command.run = run
    monkeypatch.setitem(sys.modules, "broken_command", command)
    assert run_module("broken_command", []) == 1
    line = _one_line_error(capsys.readouterr().err, "python -m broken_command")
    assert "RuntimeError: disk full while writing" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="disk full"):
        run_module("broken_command", ["--debug"])


def test_python_dash_m_goes_through_the_same_runner(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dynts.evals.bench_linear_attention", "--parts", "nope"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line_error(result.stderr, "python -m dynts.evals.bench_linear_attention")
    assert "--parts nope" in line


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dynts {metadata.version('dynts')}"


COMMAND_MODULES = [(module, f"dynts {name}") for name, (module, _) in COMMANDS.items()]
COMMAND_MODULES += [(module, f"python -m {module}") for module in SCRIPTS]


@pytest.mark.parametrize("module_name, prog", COMMAND_MODULES, ids=[prog for _, prog in COMMAND_MODULES])
def test_every_option_has_help(module_name: str, prog: str) -> None:
    if module_name == "dynts.evals.bench_kernels":
        pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")
    parser = command_parser(importlib.import_module(module_name), prog)
    silent = [action.option_strings for action in parser._actions if action.option_strings and not (action.help or "").strip()]
    assert silent == []
    assert "--debug" in parser.format_help()


def test_bench_interleaves_its_runs_and_reports_median_spread_and_pair_ratios(monkeypatch, capsys) -> None:
    from dynts.evals import bench_generate

    order: list[str] = []
    timed = bench_generate._timed_generate

    def recorded(model, prompt, new_tokens, cache=None):
        order.append(type(cache).__name__)
        return timed(model, prompt, new_tokens, cache)

    monkeypatch.setattr(bench_generate, "_timed_generate", recorded)
    assert main(["bench", "--json", "--repeats", "3", "--layers", "1", "--hidden-size", "64", "--heads", "4",
                 "--kv-heads", "2", "--vocab-size", "128", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "24",
                 "--budget", "16", "--window", "4", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Two warm-ups, then full and dynts in turn.
    assert order == ["NoneType", "DynTSCache"] + ["DynamicCache", "DynTSCache"] * 3
    full, dynts = result["full_seconds"], result["dynts_seconds"]
    assert len(full) == len(dynts) == 3
    assert result["full_ms_per_step"]["median"] == pytest.approx(1000 * statistics.median(full) / 24)
    assert result["dynts_tokens_per_s"]["min"] == pytest.approx(2 * 24 / max(dynts))
    pair_ratios = [f / d for f, d in zip(full, dynts)]
    assert result["throughput_ratio"] == pytest.approx(
        {"median": statistics.median(pair_ratios), "min": min(pair_ratios), "max": max(pair_ratios)})
    # 8 + 24 tokens held by the full cache; dynts compacts at 16.
    assert result["compactions"] > 0 and result["dynts_peak_resident_kv_bytes"] < result["full_kv_bytes"]


# ------------------------------------------------------------------------------------------ the README's commands

COMMAND_START = re.compile(r"^(dynts\s|dynts$|python -m dynts\.)")
# Appended to each README command (argparse keeps an option's last value): the same command on a small workload.
REDUCED = {
    "demo": ["--problems", "1", "--max-new-tokens", "8", "--no-progress"],
    "generate": ["--max-new-tokens", "8"],
    "eval": ["--limit", "1", "--max-new-tokens", "8", "--no-progress", "--no-plots"],
    "label": ["--limit", "2", "--greedy", "--max-new-tokens", "400", "--keep-incorrect"],
    "train-predictor": ["--epochs", "2", "--val-fraction", "0.5"],
    "bench": ["--new-tokens", "16", "--prompt-len", "8", "--budget", "12", "--window", "4", "--repeats", "1", "--device", "cpu"],
}


def readme_commands() -> list[list[str]]:
    """The ``dynts ...`` and ``python -m dynts...`` command lines of README.md's code blocks, in order."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if COMMAND_START.match(part.strip()):
                    commands.append(shlex.split(part, comments=True))
    return commands


def reduced(words: list[str]) -> list[str]:
    """A README command with its placeholders filled and a small workload: ``PATH`` is the bundled model, a label
    run reads the small problems of ``train.jsonl`` (written by the test) instead of drawing ``--synthetic`` ones, and
    a command given ``--device cuda`` runs on the CPU."""
    words = ["bundled" if word == "PATH" else word for word in words]
    words = ["cpu" if previous == "--device" and word.startswith("cuda") else word for previous, word in zip([""] + words, words)]
    command = words[1]
    if command == "label" and "--synthetic" in words:
        index = words.index("--synthetic")
        words[index : index + 2] = ["--data", "train.jsonl"]
    return words[1:] + REDUCED.get(command, [])


def test_readme_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands()
    names = {words[1] if words[0] == "dynts" else words[2] for words in commands}
    assert {"demo", "generate", "eval", "label", "train-predictor", "bench"} <= names, names
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNTS_DATA_DIR", str(BENCHMARK_FILES))
    # Questions for `dynts label` that the bundled reasoner finishes in ~120 tokens.
    with open("train.jsonl", "w") as handle:
        for problem in generate_problems(2, 11, TaskConfig(steps=(4, 6), saves=2, noise=1)):
            handle.write(json.dumps({"problem": problem.prompt, "answer": problem.answer}) + "\n")
    for words in commands:
        if words[0] == "python":
            # python -m scripts (GPU benchmarks, long analyses): their options and values must parse.
            module = words[2]
            command_parser(importlib.import_module(module), f"python -m {module}").parse_args(words[3:])
            continue
        assert main(reduced(words)) == 0, " ".join(words)
