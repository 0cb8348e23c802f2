"""The language-model learner (`kind = "lm"`): LoRA adapters on a base causal LM, learning from rated answers.

One piece per module: `base` (load a base model and tokenizer, add adapters),
`chat` (conversations to token ids, the learned tokens marked), `topics`
(hashed embeddings of the user's words), `replay` (a buffer sampling across
topics), `capabilities` (named held-out conversation sets and their scores),
`served` (an adapter artifact back as a ready model), `tiny` (a small random
Llama built in-process, for tests), `learner` (`LmLearner`).
"""
