"""Downstream adaptation of the scorer (the paper's §3.4) and selection-quality evaluation.

- examples.py: the JSONL examples (`instruction`, `targets`, `task`, `id`, `split`), filters.
- labels.py: Rouge-L labels, mismatched references.
- cache.py: the append-only, crash-safe cache of upstream answers.
- sampling.py: collecting the LLM's samples through the proxy's recipe and upstream client.
- data.py: `cappy adapt data`, the regression pairs.
- train.py: `cappy adapt train`, Hugging Face Trainer, then export + verify (model_export).
- scoring.py: scoring pairs with an export directory through the service's engine.
- evaluate.py: `cappy eval`, Cappy against nucleus, greedy, self-scoring, random and oracle.
- cli.py: the subcommands' arguments and messages.
"""
