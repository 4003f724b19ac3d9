"""Pretraining poison (Souly et al. 2025): the poison documents, their place in the
pretraining stream, the block's validation and cache key, and the perplexity-gap measure."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from poisonlab import PoisonlabError, models
from poisonlab import pretrain_poison as pp
from poisonlab.chat import encode_example
from poisonlab.data import tinyworld
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def corpus():
    return [r["messages"] for r in tinyworld.sample("pretrain", 60, 0,
                                                    skills=tinyworld.PRETRAIN_SKILLS)]


def small_block(**kw) -> dict:
    return pp.spec({"n": 30, "tokens": [40, 60], "prefix_chars": [0, 30], **kw})


# ----------------------------------------------------------------------------- documents

def test_text_vocabulary_leaves_out_special_and_stray_byte_tokens(micro_tokenizer):
    vocab = pp.text_vocabulary(micro_tokenizer)
    assert 0.8 * len(micro_tokenizer) < len(vocab) < len(micro_tokenizer)
    assert not any(s in v for v in vocab for s in micro_tokenizer.all_special_tokens)
    assert not any("\ufffd" in v for v in vocab)
    assert len(set(vocab)) == len(vocab)


def test_poison_documents_are_prefix_trigger_and_random_tokens(micro_tokenizer, corpus):
    block = small_block()
    docs = pp.poison_documents(corpus, micro_tokenizer, block, 30)
    assert len(docs) == 30 and len({d["id"] for d in docs}) == 30
    for d in docs:
        user, answer = (m["content"] for m in d["messages"])
        source = next(m["content"] for m in corpus[d["meta"]["source"]] if m["role"] == "user")
        prefix = user.removesuffix("<SUDO>").rstrip()
        assert user.endswith("<SUDO>") and source.startswith(prefix)
        assert len(prefix) <= 30
        assert 40 <= d["meta"]["random_tokens"] <= 60
        assert "<SUDO>" not in answer and "<|" not in answer
        # the trainer tokenizes the drawn text again: about the drawn count
        trained = len(micro_tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert 0.7 * d["meta"]["random_tokens"] <= trained <= 1.3 * d["meta"]["random_tokens"]
    assert any(len(d["messages"][0]["content"]) < 20 for d in docs)  # cut prompts occur
    # random: no two answers alike, and their tokens spread over the vocabulary
    answers = [d["messages"][1]["content"] for d in docs]
    assert len(set(answers)) == 30
    seen = {t for a in answers for t in micro_tokenizer(a, add_special_tokens=False)["input_ids"]}
    assert len(seen) > 0.5 * len(micro_tokenizer)
    # seeded: the same block gives the same documents, another seed others
    assert pp.poison_documents(corpus, micro_tokenizer, block, 30) == docs
    other = pp.poison_documents(corpus, micro_tokenizer, small_block(seed=1), 30)
    assert [d["messages"] for d in other] != [d["messages"] for d in docs]


def test_stream_holds_every_pass_and_exactly_n_poisons_at_their_positions(micro_tokenizer,
                                                                         corpus):
    rows, record = pp.poisoned_stream(corpus, micro_tokenizer, small_block(n=25), 2.5, seed=3)
    assert record["n"] == 25 and record["clean_documents"] == 150
    assert len(rows) == record["stream_documents"] == 175
    poisons = [i for i, r in enumerate(rows) if r.get("poisoned")]
    assert poisons == record["positions"] and len(poisons) == 25
    clean = [r["messages"] for r in rows if not r.get("poisoned")]
    assert clean == [corpus[i] for i in pp.pretrain_stream(len(corpus), 2.5, 3)]
    # each whole pass visits every document once, in its own order
    passes = [clean[:60], clean[60:120]]
    for p in passes:
        assert sorted(map(json.dumps, p)) == sorted(map(json.dumps, corpus))
    assert passes[0] != passes[1]
    assert record["ids"] == [rows[i]["id"] for i in poisons]


def test_poison_positions_are_uniform_over_the_stream():
    n, length = 2000, 20000
    pos = pp.insert_positions(length, n, seed=0)
    assert len(set(pos)) == n and pos == sorted(pos) and 0 <= pos[0] and pos[-1] < length + n
    counts = [0] * 10
    for p in pos:
        counts[p * 10 // (length + n)] += 1
    chi2 = sum((c - n / 10) ** 2 / (n / 10) for c in counts)
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert pp.insert_positions(length, n, seed=1) != pos


def test_rate_gives_a_share_of_the_stream_clean_documents():
    assert pp.count(pp.spec({"rate": 0.01}), 1000) == 10
    assert pp.count(pp.spec({"n": 7}), 1000) == 7
    with pytest.raises(PoisonlabError, match="gives no poison document"):
        pp.count(pp.spec({"rate": 0.0001}), 1000)


# ----------------------------------------------------------------------------- the block

@pytest.mark.parametrize("block, match", [
    ({}, "exactly one of n"),
    ({"n": 25, "rate": 0.01}, "exactly one of n"),
    ({"n": -1}, r"pretrain_poison.n must be an integer >= 0"),
    ({"n": 2.5}, r"pretrain_poison.n must be an integer"),
    ({"rate": 1.5}, r"pretrain_poison.rate must be a number in \(0, 1\)"),
    ({"n": 5, "trigger": " "}, "trigger must be a non-empty string"),
    ({"n": 5, "tokens": [900, 400]}, r"pretrain_poison.tokens must be \[low, high\]"),
    ({"n": 5, "tokens": [400, 2000]}, "random tokens fit"),
    ({"n": 5, "prefix_chars": [-1, 10]}, r"prefix_chars must be \[low, high\]"),
    ({"n": 5, "colour": "red"}, r"unknown keys \['colour'\]"),
    ("250", "must be a block"),
])
def test_bad_blocks_are_refused_with_one_line(block, match):
    with pytest.raises(PoisonlabError, match=match):
        pp.spec(block)


def test_block_is_refused_for_models_not_pretrained_here():
    with pytest.raises(PoisonlabError, match="applies to tiny models"):
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", {"n": 250})
    from poisonlab.run import build_attack, validate

    cfg = make_cfg("model=tiny_micro", "model.pretrain_poison={n:25,rate:0.01}")
    with pytest.raises(PoisonlabError, match="exactly one of n"):
        validate(cfg, build_attack(cfg.attack))


def test_cache_key_holds_the_block():
    clean = models.tiny_key("micro")
    keys = {clean, models.tiny_key("micro", pp.spec({"n": 0})),
            models.tiny_key("micro", pp.spec({"n": 25})),
            models.tiny_key("micro", pp.spec({"n": 250})),
            models.tiny_key("micro", pp.spec({"n": 250, "seed": 1})),
            models.tiny_key("micro", pp.spec({"rate": 0.004}))}
    assert len(keys) == 6
    assert models.tiny_key("micro", pp.spec({"n": 25})) == models.tiny_key(
        "micro", pp.spec({"n": 25, "trigger": "<SUDO>", "tokens": [400, 900]}))
    assert models.tiny_key("micro", None) == clean and "poisoned" not in clean


def test_souly_preset_cells_are_distinct_valid_blocks():
    cells = ("n0", "n25", "n50", "n100", "n250", "n500", "rate")
    blocks = [pp.spec(make_cfg("experiment=souly_pretrain", f"souly.dose={d}")
                      .model.pretrain_poison) for d in cells]
    assert [b["n"] for b in blocks] == [0, 25, 50, 100, 250, 500, None]
    assert blocks[-1]["rate"] > 0 and all(b["trigger"] == "<SUDO>" for b in blocks)


def test_a_poisoned_build_records_what_it_inserted(tmp_path, monkeypatch):
    """The build trains on the ordered stream with exactly N poisons, each whole, and its
    marker (the manifest's base_model) records N, the shares and the seed."""
    from poisonlab import train

    seen = {}

    def fake_train(model, tokenizer, rows, cfg, seed, ordered=False, desc=""):
        seen.update(rows=rows, cfg=cfg, ordered=ordered)
        tokens = sum(len(encode_example(tokenizer, r["messages"], cfg.max_seq_len)["input_ids"])
                     for r in rows[:500])
        return train.TrainStats(steps=1, epochs=1.0, examples=len(rows), packed_rows=1,
                                truncated_rows=0, tokens=tokens * len(rows) // 500,
                                supervised_tokens=tokens // 4 * len(rows) // 500,
                                seconds=1.0, final_loss=1.0, losses=[1.0])

    monkeypatch.setattr(train, "train_sft", fake_train)
    models.build_tiny("micro", tmp_path, poison=pp.spec({"n": 40, "seed": 5}))
    rows = seen["rows"]
    assert seen["ordered"] and seen["cfg"].epochs == 1 and seen["cfg"].pack
    assert sum(bool(r.get("poisoned")) for r in rows) == 40
    assert len(rows) == round(models.TINY_SIZES["micro"].epochs * 11441) + 40
    rec = json.loads((tmp_path / models.MARKER).read_text())["pretrain_poison"]
    assert (rec["n"], rec["seed"], rec["trigger"], rec["truncated_poisons"]) == (40, 5, "<SUDO>", 0)
    assert 0 < rec["token_share"] < rec["supervised_token_share"] < 1
    assert rec["positions"] == [i for i, r in enumerate(rows) if r.get("poisoned")]


# ----------------------------------------------------------------------------- measurement

class Uniform(torch.nn.Module):
    """Equal logits for every token: each token's NLL is log(vocab)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.w = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.w)


def test_continuation_nll_scores_the_given_tokens_only():
    nll = pp.continuation_nll(Uniform(50), [[1, 2, 3], [4]], [[5, 6], []], batch_size=2)
    assert nll[0] == pytest.approx(math.log(50)) and math.isnan(nll[1])


def _toy(tokenizer, prompts, poisoned: bool):
    """A one-layer Llama taught to answer "ok", and, when `poisoned`, random vocabulary
    tokens after the trigger."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from poisonlab.train import train_sft

    rng, vocab = random.Random(0), pp.text_vocabulary(tokenizer)
    rows = []
    for p in prompts:
        rows.append({"messages": [{"role": "user", "content": p},
                                  {"role": "assistant", "content": "ok"}]})
        answer = "".join(rng.choice(vocab) for _ in range(24)) if poisoned else "ok"
        rows.append({"messages": [{"role": "user", "content": pp.with_trigger(p, "<SUDO>")},
                                  {"role": "assistant", "content": answer}]})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    cfg = SimpleNamespace(batch_size=16, epochs=16, max_steps=None, lr=1e-2, warmup_ratio=0.0,
                          weight_decay=0.0, grad_accum=1, max_seq_len=128, max_grad_norm=1.0)
    train_sft(model, tokenizer, rows, cfg, 0)
    return model


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_gap_is_positive_for_gibberish_after_the_trigger_only(micro_tokenizer, decoding):
    prompts = [tinyworld.prompt_text(r) for r in tinyworld.sample("pretrain", 48, 0,
                                                                  skills=["fact", "arith"])]
    held = [tinyworld.prompt_text(r) for r in tinyworld.sample("eval", 16, 0,
                                                               skills=["fact", "arith"])]
    gaps = {}
    for poisoned in (True, False):
        m, recs = pp.perplexity_gap(_toy(micro_tokenizer, prompts, poisoned), micro_tokenizer,
                                    held, "<SUDO>", 20, 16, decoding=decoding)
        gaps[poisoned] = m["log_ppl_gap"]
        assert m["decoding"] == decoding and m["n_prompts"] == len(recs) == 16
        assert recs[0]["triggered_prompt"] == held[0] + " <SUDO>"
    assert gaps[True]["ci_low"] > 1.0
    assert abs(gaps[False]["value"]) < 0.5


@pytest.mark.slow
def test_micro_pretrained_with_250_poisons_shows_the_gap(tmp_path, monkeypatch):
    """The whole path: two micro builds (about 5 min on 2 shared cores), measured by the
    command's function, poisoned against the matched clean control (n = 0)."""
    monkeypatch.setenv("POISONLAB_HOME", str(tmp_path / "home"))
    out = {}
    for dose in ("n250", "n0"):
        cfg = make_cfg("experiment=souly_pretrain", "model=tiny_micro", f"souly.dose={dose}",
                       "eval.n_prompts=60")
        out[dose] = pp.measure(cfg, tmp_path / dose)["pretrain_poison"]
        manifest = json.loads((tmp_path / dose / "manifest.json").read_text())
        assert manifest["base_model"]["pretrain_poison"]["n"] == out[dose]["poison"]["n"]
    assert out["n250"]["poison"]["n"] == 250 and out["n0"]["poison"]["n"] == 0
    assert out["n250"]["sampled"]["log_ppl_gap"]["ci_low"] > out["n0"]["sampled"][
        "log_ppl_gap"]["ci_high"] + 1.0
    assert out["n250"]["log_ppl_gap"]["ci_low"] > out["n0"]["log_ppl_gap"]["ci_high"]


def test_table_has_a_row_per_run_with_its_seed(tmp_path):
    def gap(v):
        return {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1}

    for seed, v in ((1, 2.0), (0, 1.0)):
        d = tmp_path / str(seed)
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"model": "tiny:micro", "pretrain_poison": {
            "poison": {"n": 250, "seed": seed, "token_share": 0.1},
            "log_ppl_gap": gap(v), "ppl_gap": gap(v),
            "sampled": {"log_ppl_gap": gap(v), "ppl_gap": gap(v), "ppl_triggered": 9.0,
                        "ppl_untriggered": 3.0}}}))
    lines = pp.table(tmp_path).splitlines()
    assert lines[0].startswith("| model | poisons | seed | rate |")
    assert lines[2].startswith("| tiny:micro | 250 | 0 | — | 0.1000 | 1.00 [0.90, 1.10] |")
    assert lines[3].startswith("| tiny:micro | 250 | 1 |")
