"""An exact shortcut for the export: the last encoder layer computed for the first token only.

Cappy's score reads one position of the last layer: the first token (`<s>` / `[CLS]`), through
the classification head (RoBERTa) or the pooler (BERT). Every other position of the last layer
is computed and thrown away, so the exported graph skips them: its last layer still reads the
keys and values of every token, but runs the query, the attention output, and the feed-forward
block for the first token alone. The scores are the same function of the inputs (the export's
fp32 parity against the unmodified model checks it); the work saved is most of one layer, 1/6
of MiniLM-L6 and 1/24 of Cappy-large.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from model_export.pooling import pooling_of

# Families whose layers are BERT-shaped (attention.self.{query,key,value}, attention.output,
# intermediate, output) with absolute positions, and whose head reads the first token.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def supports(model: Any) -> bool:
    """Whether `model` (a *ForSequenceClassification) can be wrapped by `FirstTokenScorer`."""
    config = model.config
    base = getattr(model, "base_model", None)
    return (
        pooling_of(config) == "cls"  # a mean-pooled score reads every position
        and config.model_type in SUPPORTED_MODEL_TYPES
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and base is not None
        and hasattr(base, "encoder")
        and len(base.encoder.layer) >= 2
        and hasattr(model, "classifier")
    )


class FirstTokenScorer(torch.nn.Module):
    """`model`'s logits, with its last layer evaluated at the first position only.

    Shares `model`'s parameters and leaves `model` itself unchanged.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not supported")
        self.model_type = model.config.model_type
        base = model.base_model
        # A shallow copy of the base model whose encoder stops one layer early and has no pooler:
        # the parameters are shared, the original module tree is not touched.
        encoder = copy.copy(base.encoder)
        encoder._modules = dict(base.encoder._modules)
        encoder.layer = torch.nn.ModuleList(list(base.encoder.layer)[:-1])
        trunk = copy.copy(base)
        trunk._modules = dict(base._modules)
        trunk.encoder = encoder
        if getattr(base, "pooler", None) is not None:
            trunk.pooler = None
        self.trunk = trunk
        self.last = base.encoder.layer[-1]
        self.pooler = getattr(base, "pooler", None)  # BERT: dense + tanh on the first token
        self.dropout = getattr(model, "dropout", None)
        self.classifier = model.classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs
        ).last_hidden_state
        first = self._last_layer_first_token(hidden, attention_mask)  # [batch, 1, hidden]
        if self.pooler is not None:  # BERT: pooler -> dropout -> classifier
            pooled = self.pooler(first)
            if self.dropout is not None:
                pooled = self.dropout(pooled)
            return self.classifier(pooled)
        return self.classifier(first)  # RoBERTa's head takes features[:, 0]

    def _last_layer_first_token(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        attention = self.last.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        batch, length, _ = hidden.shape

        def split(x: torch.Tensor, positions: int) -> torch.Tensor:
            return x.view(batch, positions, heads, size).transpose(1, 2)

        query = split(attention.query(hidden[:, :1]), 1)  # [batch, heads, 1, size]
        key = split(attention.key(hidden), length)
        value = split(attention.value(hidden), length)
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(size)
        blocked = (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(
            scores.dtype
        ).min
        probs = torch.softmax(scores + blocked, dim=-1)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, 1, heads * size)
        attended = self.last.attention.output(context, hidden[:, :1])
        return self.last.output(self.last.intermediate(attended), attended)
