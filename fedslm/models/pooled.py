"""The mean-pooling sentence classifier (``model.pooling: mean``) and its label-name head.

Sentence-embedding models such as all-MiniLM-L6-v2 were trained to be read by the masked mean
of their last hidden states. On the public benchmark data sets that feature, L2-normalised,
gives a linear probe 4-9 accuracy points more than BERT's pooler on the [CLS] token
(docs/benchmarks.md, section 3), so it is fedslm's default head for classification.

A stranger reloads a fedslm adapter trained this way with transformers, PEFT and this one small
class (docs/models.md shows it whole); ``fedslm.models.adapter.load_exported`` does exactly that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

HEAD = ("classifier",)


class MeanPoolClassifier(nn.Module):
    """``encoder`` (any ``AutoModel``), masked mean over tokens, unit length, a linear layer,
    logits times ``logit_scale``."""

    def __init__(self, encoder: nn.Module, num_labels: int, logit_scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        config: Any = encoder.config
        self.config = config  # PEFT and transformers utilities look for it
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.logit_scale = logit_scale

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unit-length mean of the last hidden states over the real (unpadded) tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled.float(), dim=-1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features (the part a linear probe trains)."""
        return self.logit_scale * self.classifier(features)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object
    ) -> SequenceClassifierOutput:
        """Logits for a batch, in the shape transformers' classifiers return."""
        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask)))


def build_mean_pool_classifier(
    path: Path, num_labels: int, logit_scale: float
) -> tuple[MeanPoolClassifier, dict[str, list[str]]]:
    """The base model at ``path`` under a new mean-pooling head, and transformers' load report."""
    from transformers import AutoModel

    encoder, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    return MeanPoolClassifier(encoder, num_labels, logit_scale), info


@torch.no_grad()
def label_name_rows(
    model: MeanPoolClassifier, tokenizer, labels: list[str], device: torch.device
) -> torch.Tensor:
    """One unit-length row per label: the model's own feature of the label's name.

    Names are read as words (``card_arrival`` -> "card arrival"). The head ``W = rows``, bias
    0, scores a text by its cosine similarity to each label name: a zero-shot classifier that
    training then refines. Only the public label set is used, so this costs no privacy.
    """
    from fedslm.labelwords import label_word

    names = [label_word(label) for label in labels]
    batch = tokenizer(names, padding=True, return_tensors="pt")
    was_training = model.training
    model.eval()
    rows = model.features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    model.train(was_training)
    return rows
