"""``dynts generate``: generate from a local HF causal LM with a DynTSCache; print the texts and the cache stats.

    dynts generate --model bundled --prompt "a 3 + b 7 - c 1 + n5 s1 t2 s2 t3 <think>" --budget 256 --window 64
    dynts generate --model PATH --prompt "Solve 3x + 5 = 20." --budget 3000 --window 1000 --scorer h2o

Every setting, the predictor head and the end-of-thinking marker are checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import (
    UsageError, add_model_arguments, chat_template_choice, check_predictor_fits, load_model, load_tokenizer,
    make_settings, non_negative_float, non_negative_int, positive_int, read_predictor, shipped_predictor,
    think_end_ids, unit_fraction,
)
from ..config import GRANULARITIES, CompressionConfig
from ..scorers import SCORERS

# `external` needs a Python scoring function, which a command line cannot give.
SCORER_CHOICES = sorted(name for name in SCORERS if name != "external")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation of the model")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat the option for a batch)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap each prompt in the tokenizer's chat template (default: when the tokenizer has one)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=unit_fraction, default=1.0, help="nucleus sampling share (with --temperature > 0)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    parser.add_argument("--predictor", type=Path, default=None, metavar="PATH",
                        help="trained Importance Predictor head (from dynts train-predictor); default: the shipped "
                             "head when --model is bundled")
    group = parser.add_argument_group("compression (checked by CompressionConfig)")
    group.add_argument("--budget", type=int, default=3000, help="compact a row when it holds this many tokens; > --window")
    group.add_argument("--window", type=int, default=1000, help="most recent tokens always kept; >= 0")
    group.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens kept, in (0, 1]")
    group.add_argument("--scorer", default=None, choices=SCORER_CHOICES,
                       help="token-importance scorer (default: predictor when a head is given or shipped, else h2o)")
    group.add_argument("--granularity", default="shared", choices=GRANULARITIES,
                       help="one keep-set per row (shared), per layer, or per layer and KV head")
    group.add_argument("--think-end", default="</think>", help="end-of-thinking marker text ('' for none)")
    group.add_argument("--no-protect-prompt", action="store_true", help="let prompt tokens be evicted")
    group.add_argument("--no-protect-answer", action="store_true", help="let the tokens after the marker be evicted")


def run(args: argparse.Namespace) -> int:
    import torch

    settings = dict(budget=args.budget, window=args.window, keep_ratio=args.keep_ratio, granularity=args.granularity,
                    protect_prompt=not args.no_protect_prompt, protect_answer=not args.no_protect_answer)
    make_settings(CompressionConfig, **settings)  # the numbers first, before the tokenizer is read
    predictor_path = args.predictor
    if predictor_path is None and args.scorer in (None, "predictor"):
        predictor_path = shipped_predictor(args.model)
    scorer_name = args.scorer or ("predictor" if predictor_path is not None else "h2o")
    if scorer_name == "predictor" and predictor_path is None:
        raise UsageError("--scorer predictor needs --predictor PATH (a head from `dynts train-predictor`)")
    if args.predictor is not None and scorer_name != "predictor":
        raise UsageError(f"--predictor is only used with --scorer predictor, not with --scorer {scorer_name}")
    head = identity = None
    if scorer_name == "predictor":
        head, identity = read_predictor(predictor_path, args.model)

    tokenizer = load_tokenizer(args.model)
    think_end = think_end_ids(tokenizer, args.think_end) if args.think_end else None
    config = make_settings(CompressionConfig, **settings, think_end=think_end)
    use_template = chat_template_choice(tokenizer, args.chat_template)
    scorer = scorer_name
    if scorer_name == "sepllm":
        from ..scorers.positional import SepLLMScorer

        try:
            scorer = SepLLMScorer.from_tokenizer(tokenizer)
        except ValueError as error:
            raise UsageError(f"--scorer sepllm: {error}") from error

    model, _ = load_model(args.model, args.device, args.dtype, attn=args.attn, tokenizer=tokenizer)
    if head is not None:
        from ..predictor import PredictorScorer

        check_predictor_fits(identity, model, predictor_path)
        scorer = PredictorScorer(head, model=model)
    from ..integrations.hf import DynTSCache

    prompts = args.prompt
    if use_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                   for prompt in prompts]
    device = next(model.parameters()).device
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not use_template).to(device)
    cache = DynTSCache(model, config, scorer=scorer)
    torch.manual_seed(args.seed)
    sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
                if args.temperature > 0 else dict(do_sample=False))
    output = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, **sampling)
    for row, sequence in enumerate(output[:, inputs["input_ids"].shape[1]:]):
        print(f"--- output {row}")
        print(tokenizer.decode(sequence, skip_special_tokens=True))
    print(json.dumps({"scorer": scorer_name, "physical_len": cache.physical_len, **cache.stats.as_dict()}, indent=2))
    return 0
