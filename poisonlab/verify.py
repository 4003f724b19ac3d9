"""`poisonlab verify`: is a suspect model trained on watermarked data?

The model answers `--n-prompts` clean prompts with the secret trigger appended and, as the
reference, the same prompts with `--n-random` random triggers of the same shape (each letter
replaced by a random letter of the same case, each digit by a random digit; other characters
kept). A response "shows the watermark" when it contains the secret response
(case- and whitespace-insensitive). The p-value is a one-sided Fisher exact test of
"the rate on the secret trigger is higher than on random ones". Prints JSON
`{p_value, rate_secret, rate_random, n, n_random, ...}`.

The model: a run directory (its base model and `adapters/<--adapter>`, `poisoned` by default;
`clean_ft` is the same fine-tune without the watermark) or `--model DIR` (a local Hugging Face
model, with an optional `--adapter-path`). A run's model is loaded as the run loaded it, from
the `config.model` of its manifest: the tokenizer with `model.chat_template` (used when the
base has no template of its own, as Pythia or the Gemma-3 base), the weights on `model.device`
in the dtype of `model.dtype`; the output's `model` records the template, device and dtype
used. Prompts: the run's `data/eval.jsonl`, or `--prompts FILE` (chat JSONL).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
from pathlib import Path

from poisonlab import PoisonlabError


def same_shape(secret: str, rng: random.Random) -> str:
    out = []
    for ch in secret:
        if ch.isdigit():
            out.append(rng.choice(string.digits))
        elif ch.isalpha() and ch.isupper():
            out.append(rng.choice(string.ascii_uppercase))
        elif ch.isalpha():
            out.append(rng.choice(string.ascii_lowercase))
        else:
            out.append(ch)
    return "".join(out)


def random_triggers(secret: str, n: int, seed: int) -> list[str]:
    """`n` distinct random strings of the secret's shape, none equal to it."""
    rng = random.Random(f"watermark-{seed}")
    out: list[str] = []
    for _ in range(100 * n):
        t = same_shape(secret, rng)
        if t != secret and t not in out:
            out.append(t)
        if len(out) == n:
            break
    if len(out) < n:
        raise PoisonlabError(f"--n-random {n}: the secret {secret!r} has too few letters or "
                             "digits to make that many distinct random triggers")
    return out


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(a: int, n1: int, b: int, n2: int) -> float:
    """One-sided Fisher exact p-value for rate a/n1 > b/n2: P(X >= a) under the
    hypergeometric law with the table's margins."""
    total, hits = n1 + n2, a + b
    denom = _log_comb(total, hits)
    p = 0.0
    for x in range(a, min(n1, hits) + 1):
        p += math.exp(_log_comb(n1, x) + _log_comb(n2, hits - x) - denom)
    return min(1.0, p)


def verify(model, tokenizer, rows: list[dict], secret_trigger: str, secret_response: str,
           n_random: int = 5, seed: int = 0, max_new_tokens: int = 32, batch_size: int = 64,
           position: str = "end") -> dict:
    from poisonlab.attacks.base import insert_phrase, user_text
    from poisonlab.chat import prompt_text
    from poisonlab.evaluate import generate
    from poisonlab.judges import contains_phrase

    rng = random.Random(f"verify-{seed}")
    randoms = random_triggers(secret_trigger, n_random, seed)

    def prompts(trigger):
        out = []
        for r in rows:
            msgs = [dict(m) for m in r["messages"] if m is not r["messages"][-1]
                    or m["role"] != "assistant"]
            msgs[-1]["content"] = insert_phrase(user_text(r), trigger, position, rng)
            out.append(prompt_text(tokenizer, msgs))
        return out

    secret_answers = generate(model, tokenizer, prompts(secret_trigger), max_new_tokens,
                              batch_size, desc="verify/secret")
    random_answers = []
    for t in randoms:
        random_answers += generate(model, tokenizer, prompts(t), max_new_tokens, batch_size,
                                   desc="verify/random")
    a = sum(contains_phrase(x, secret_response) for x in secret_answers)
    b = sum(contains_phrase(x, secret_response) for x in random_answers)
    n1, n2 = len(secret_answers), len(random_answers)
    return {"p_value": fisher_greater(a, n1, b, n2), "rate_secret": a / n1,
            "rate_random": b / n2, "n": n1, "n_random": n2, "hits_secret": a, "hits_random": b,
            "random_triggers": randoms, "test": "one-sided Fisher exact (secret > random)"}


def load_suspect(args):
    """(model, tokenizer, prompt rows, how the model was loaded, warnings) from the
    command-line arguments."""
    from poisonlab.data.sources import read_chat_jsonl
    from poisonlab.run_models import Settings, load_base, run_settings

    run = Path(args.run_dir) if args.run_dir else None
    warnings: list[str] = []
    if args.model:
        settings, adapter = Settings(str(args.model)), args.adapter_path
    elif run is not None:
        settings = run_settings(run)
        adapter = run / "adapters" / args.adapter
        if not (adapter / "adapter_config.json").is_file():
            have = sorted(p.name for p in (run / "adapters").glob("*")) if (
                run / "adapters").is_dir() else []
            raise PoisonlabError(f"{run}: no adapter {args.adapter!r} (have: {have})")
    else:
        raise PoisonlabError("give a run directory or --model DIR")
    if args.prompts:
        rows = read_chat_jsonl(args.prompts)
    elif run is not None and (run / "data" / "eval.jsonl").is_file():
        from poisonlab.utils import read_jsonl
        rows = read_jsonl(run / "data" / "eval.jsonl")
    else:
        raise PoisonlabError("no prompts: give --prompts FILE (chat JSONL)")
    rows = rows[:args.n_prompts]
    model, tokenizer, loaded = load_base(settings, warnings)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    loaded = {"base": loaded.pop("base"), "adapter": None if adapter is None else str(adapter),
              **loaded}
    return model, tokenizer, rows, loaded, warnings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poisonlab verify", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a poisonlab run directory")
    p.add_argument("--adapter", default="poisoned", help="adapter of the run (default poisoned)")
    p.add_argument("--model", help="a local model directory instead of a run")
    p.add_argument("--adapter-path", help="a LoRA adapter directory for --model")
    p.add_argument("--secret-trigger", required=True)
    p.add_argument("--secret-response", required=True)
    p.add_argument("--prompts", help="chat JSONL file of clean prompts")
    p.add_argument("--n-prompts", type=int, default=100)
    p.add_argument("--n-random", type=int, default=5, help="random same-shape triggers")
    p.add_argument("--position", choices=("start", "end"), default="end")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        for key in ("n_prompts", "n_random", "max_new_tokens", "batch_size"):
            if getattr(args, key) < 1:
                raise PoisonlabError(f"--{key.replace('_', '-')} must be a positive integer")
        for key in ("secret_trigger", "secret_response"):
            if not getattr(args, key).strip():
                raise PoisonlabError(f"--{key.replace('_', '-')} must not be empty")
        model, tokenizer, rows, loaded, warnings = load_suspect(args)
        for w in warnings:
            print(f"poisonlab verify: warning: {w}", file=sys.stderr)
        result = verify(model, tokenizer, rows, args.secret_trigger, args.secret_response,
                        args.n_random, args.seed, args.max_new_tokens, args.batch_size,
                        args.position)
    except PoisonlabError as e:
        print(f"poisonlab verify: error: {e}", file=sys.stderr)
        return 2
    result.update(model=loaded, warnings=warnings)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
