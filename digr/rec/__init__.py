"""rec: the generative recommender, its constrained decoder, and supervised training (SFT).

Owns: the SID token vocabulary and the T5 recommender (`seqmodel`), the prefix trie of valid
SIDs (`trie`), the shared constrained beam search that evaluation, serving and RL all call
(`decode`), tensors that grow by rows in amortised O(rows added) when items are added
(`rows`), examples -> token tensors (`sft_data`), and SFT on Ray Train (`sft`).
The decoder lives here, not in a package of its own, because SFT validates by decoding and the
decoder drives the model's own layers: a separate package would import this one and be imported
by it.
May import: digr.platform, digr.data, digr.evidence, digr.tokenizer.
"""
