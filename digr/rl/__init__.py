"""rl: GRPO on the SFT model (QARM reward).

Owns: the reward registry (`rewards`: exact, valid, prefix, QARM quality bonus, rank,
interest) and GRPO on Ray Train with group advantages, PPO-clip + KL, DeepSpeed ZeRO 0-3 and
rollout-worker actors (`grpo`).
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer, digr.rec.
"""
