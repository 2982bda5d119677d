"""``dynts generate``: generate from a local HF causal LM with a DynTSCache and print the text and cache stats."""

from __future__ import annotations

import argparse
import json

import torch

from ..config import GRANULARITIES, CompressionConfig, resolve_think_end
from ..scorers import SCORERS


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The CompressionConfig / scorer options shared by the subcommands that build a DynTSCache."""
    group = parser.add_argument_group("compression")
    group.add_argument("--budget", type=int, default=3000, help="compact a row when it holds this many tokens")
    group.add_argument("--window", type=int, default=1000, help="most recent tokens always kept")
    group.add_argument("--keep-ratio", type=float, default=0.3, help="share of older tokens kept, in (0, 1]")
    group.add_argument("--scorer", default="h2o", choices=sorted(SCORERS), help="token-importance scorer")
    group.add_argument("--granularity", default="shared", choices=GRANULARITIES)
    group.add_argument("--think-end", default="</think>", help="end-of-thinking marker text ('' to disable)")
    group.add_argument("--no-protect-prompt", action="store_true", help="let prompt tokens be evicted")
    group.add_argument("--no-protect-answer", action="store_true", help="let post-thinking tokens be evicted")


def compression_config(args: argparse.Namespace, tokenizer) -> CompressionConfig:
    think_end = resolve_think_end(tokenizer, args.think_end) if args.think_end else None
    return CompressionConfig(
        budget=args.budget, window=args.window, keep_ratio=args.keep_ratio, granularity=args.granularity,
        think_end=think_end, protect_prompt=not args.no_protect_prompt, protect_answer=not args.no_protect_answer,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="path of a local HF causal LM (config, weights, tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--predictor", default=None, metavar="PATH",
                        help="trained Importance Predictor head (dynts train-predictor); implies --scorer predictor")
    add_compression_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..integrations.hf import DynTSCache

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn).to(args.device).eval()
    prompts = args.prompt
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    scorer = args.scorer
    if args.scorer == "predictor" and args.predictor is None:
        raise SystemExit("dynts generate: --scorer predictor needs --predictor PATH (a head from dynts train-predictor)")
    if args.predictor:
        from ..predictor import PredictorScorer

        scorer = PredictorScorer(args.predictor, model=model)
    cache = DynTSCache(model, compression_config(args, tokenizer), scorer=scorer)
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.temperature > 0 else dict(do_sample=False)
    output = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, **sampling)
    for row, sequence in enumerate(output[:, inputs["input_ids"].shape[1]:]):
        print(f"--- output {row}")
        print(tokenizer.decode(sequence, skip_special_tokens=True))
    print(json.dumps({"physical_len": cache.physical_len, **cache.stats.as_dict()}, indent=2))
    return 0
