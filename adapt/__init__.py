"""Downstream adaptation of the scorer (the paper's §3.4) and selection-quality evaluation.

- examples.py: the JSONL examples (`instruction`, `targets`, `task`, `id`, `split`), filters.
- labels.py: Rouge-L labels, mismatched references.
- cache.py: the append-only, crash-safe cache of upstream answers.
- sampling.py: collecting the LLM's samples through the proxy's recipe and upstream client.
- data.py: `cappy adapt data`, the regression pairs.
- heldout.py: the held-out examples of training and what an evaluation measures on them.
- trainer.py: the Trainer's batches, loss (MSE, optional listwise term), head learning rate and
  Ctrl-C.
- train.py: `cappy adapt train`, Hugging Face Trainer with the held-out stop and resume, then
  export + verify (model_export).
- scoring.py: scoring pairs with an export directory through the service's engine.
- selection.py, bootstrap.py: each method's pick, per-task means, the paired bootstrap.
- evaluate.py: `cappy eval`, Cappy against nucleus, greedy, self-scoring (mean and sum), random
  and oracle.
- cli.py: the subcommands' arguments and messages.
"""
