"""Scores read from the mean of the last layer instead of its first token, for scorers fine-tuned
from mean-pooling embedding models (sentence-transformers' all-MiniLM-L6-v2 and its kin), whose
`[CLS]` position and pooler were never trained.

A checkpoint asks for it in its config, `"cappy_pooling": "mean"` (`cappy adapt train --pooling
mean` writes it). Its weights are those of the standard `*ForSequenceClassification` model, so
it loads anywhere, but only code that reads the flag computes its score: the classifier applied
to the mean of the last hidden states over the attention mask (BERT's pooler is skipped; a
RoBERTa-style head takes the mean where it takes the first token). `cappy export` loads such a
checkpoint with that forward (model_export.source), so the exported graph, its parity reference
and `cappy verify` all compute it; the graph's inputs and output are those of every export
(`input_ids`, `attention_mask`[, `token_type_ids`] -> `logits` [batch, 1]), and the service
serves it unchanged. The last-layer-first-token shortcut (first_token.py) does not apply: every
position counts.
"""

from __future__ import annotations

import types
from typing import Any

POOLING_KEY = "cappy_pooling"
POOLINGS = ("cls", "mean")


def pooling_of(config: Any) -> str:
    """The pooling a checkpoint's config asks for: `mean`, or `cls` (the model's own head)."""
    value = getattr(config, POOLING_KEY, None) or "cls"
    if value not in POOLINGS:
        raise ValueError(f"{POOLING_KEY} {value!r}: expected one of {', '.join(POOLINGS)}")
    return str(value)


def supports(model: Any) -> bool:
    """Whether mean pooling can feed this model's head: a base model under `base_model_prefix`
    and a `classifier` (BERT's Linear, or a RoBERTa-style head reading position 0)."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and hasattr(model, prefix) and hasattr(model, "classifier")


def use_mean_pooling(model: Any) -> Any:
    """Makes `model` (a *ForSequenceClassification) score from the masked mean of its last
    hidden states, and records it in its config (saved with the checkpoint). Returns `model`.

    Raises:
        ValueError: the model's head cannot take a pooled vector (see `supports`).
    """
    if not supports(model):
        raise ValueError(f"mean pooling is not supported for {type(model).__name__}")
    setattr(model.config, POOLING_KEY, "mean")
    model.forward = types.MethodType(_mean_pooled_forward, model)
    return model


def _mean_pooled_forward(
    self: Any,
    input_ids: Any = None,
    attention_mask: Any = None,
    token_type_ids: Any = None,
    labels: Any = None,
    **_: Any,
) -> Any:
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    base = getattr(self, self.base_model_prefix)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    hidden = base(**inputs)[0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if isinstance(self.classifier, torch.nn.Linear):
        dropout = getattr(self, "dropout", torch.nn.Identity())
        logits = self.classifier(dropout(pooled))
    else:  # a head that reads features[:, 0, :] (RoBERTa, XLM-R)
        logits = self.classifier(pooled.unsqueeze(1))
    loss = None
    if labels is not None:
        loss = torch.nn.functional.mse_loss(logits[:, 0].float(), labels.float())
    return SequenceClassifierOutput(loss=loss, logits=logits)
