"""Classification by label words through a generative model (``task.classifier: label-words``).

The prompt asks the question (``task.label_prompt``: the text, and the label set), the response
is the label's name, and the model is instruction-tuned on these pairs exactly like a causal-LM
job (LoRA, per-example loss = mean cross-entropy over the response tokens, DP-SGD unchanged).
No new head is trained: fine-tuning keeps the task in the form the model was pretrained on,
which is where DP fine-tuning does best.

A text is classified as the label whose response scores highest, where a response's score is
its mean token log-probability given the prompt, over exactly the tokens training labels (the
label's name and the template's end tokens: eos, or the chat template's end of turn). The score
is therefore minus the training loss of that response, so "the label whose loss is lowest": the
mean, not the sum, keeps long label names (e.g. "general pathological conditions") from losing
to short ones by length alone, and including the end tokens makes the model say where the label
stops. Accuracy and macro-F1 are the same scores the encoder classifier reports
(``fedslm.metrics``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedslm.batching import IGNORE, Encoded, PromptTemplate
from fedslm.config import LABEL_PROMPT
from fedslm.errors import ModelError
from fedslm.metrics import macro_f1

DEFAULT_PROMPT = LABEL_PROMPT


def label_word(label: str) -> str:
    """A label as the model reads and writes it: ``card_arrival`` -> ``card arrival``."""
    return label.replace("_", " ").replace("-", " ").strip() or label


@dataclass(frozen=True)
class LabelWordData:
    """Rows encoded for label words: what training sees (prompt + gold response, response
    tokens labelled), the prompt tokens alone, and each row's gold label index."""

    encoded: Encoded
    prompts: list[list[int]]
    gold: list[int]

    def __len__(self) -> int:
        return len(self.gold)


@dataclass(frozen=True)
class LabelWordResult:
    """Scores of a model on label-word data. ``loss`` is the mean training loss of the gold
    responses (its exp: their perplexity); ``predictions`` are label indices."""

    loss: float
    accuracy: float
    macro_f1: float
    examples: int
    predictions: list[int]

    @property
    def perplexity(self) -> float:
        """Per-token perplexity of the gold responses."""
        return float(np.exp(self.loss)) if self.examples else float("nan")


class LabelWords:
    """The label set of a job as responses: tokenised once for one tokenizer and template."""

    def __init__(
        self,
        tokenizer,
        labels: list[str],
        template: PromptTemplate,
        prompt: str = DEFAULT_PROMPT,
        max_length: int = 128,
    ) -> None:
        words = [label_word(label) for label in labels]
        clash = sorted({w for w in words if words.count(w) > 1})
        if clash:
            raise ModelError(
                f"task.classifier 'label-words': labels {labels} read as the same words {clash}; "
                "rename the labels so that their names differ"
            )
        self.tokenizer, self.labels, self.words = tokenizer, labels, words
        self.template, self.prompt, self.max_length = template, prompt, max_length
        # every label's response tokens (what training labels), after the same prompt
        self.responses = [template.pair_ids(tokenizer, "", w)[1] for w in words]
        self.longest = max(len(r) for r in self.responses)
        self.overhead = len(self._prompt_ids("")) + self.longest
        if self.overhead >= max_length:
            raise ModelError(
                f"train.max_length={max_length} leaves no room for the text: the prompt "
                f"(task.label_prompt in the template) and the longest label take "
                f"{self.overhead} tokens; raise train.max_length or shorten task.label_prompt"
            )

    def render(self, text: str) -> str:
        """The prompt asking for ``text``'s label."""
        return self.prompt.replace("{labels}", ", ".join(self.words)).replace("{text}", text)

    def fit(self, text: str) -> str:
        """``text`` cut at its end so that prompt and the longest response fit ``max_length``
        (the question comes after the text, so it is never what is cut)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = self.max_length - self.overhead
        while True:
            cut = text if len(ids) <= keep else self.tokenizer.decode(ids[:keep])
            # decoding and tokenising again can merge tokens differently: measure, cut more
            excess = len(self._prompt_ids(cut)) + self.longest - self.max_length
            if excess <= 0 or keep <= 1:
                return cut
            keep = max(1, min(keep, len(ids)) - excess)

    def _prompt_ids(self, text: str) -> list[int]:
        return self.template.pair_ids(self.tokenizer, self.render(text), "")[0]

    def encode(self, texts: list[str], labels: list[str]) -> LabelWordData:
        """Prompt + gold response per row; only the response tokens carry labels."""
        index = {label: i for i, label in enumerate(self.labels)}
        input_ids, targets, prompts, gold = [], [], [], []
        for text, label in zip(texts, labels, strict=True):
            p = self._prompt_ids(self.fit(text))[-(self.max_length - self.longest) :]
            r = self.responses[index[label]]
            input_ids.append(p + r)
            targets.append([IGNORE] * len(p) + r)
            prompts.append(p)
            gold.append(index[label])
        pad = self.tokenizer.pad_token_id
        return LabelWordData(Encoded(input_ids, targets, pad), prompts, gold)

    def describe(self) -> dict[str, object]:
        """What an adapter trained this way needs to be used again (adapter metadata)."""
        return {"prompt": self.prompt, "words": self.words, "template": self.template.describe()}


@torch.no_grad()
def score_rows(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    device: torch.device,
) -> torch.Tensor:
    """Mean log-probability of every response after every prompt: ``[rows, labels]``.

    Each prompt goes through the model once; its key/value cache is then repeated for the
    candidate responses, which run as one small batch (right-padded: a padded position only
    follows the real ones, so causal attention keeps it from changing them). Only the logits
    the scores need are computed.
    """
    was_training = model.training
    model.eval()
    width = max(len(r) for r in responses)
    cand = torch.zeros((len(responses), width), dtype=torch.long)
    for k, r in enumerate(responses):
        cand[k, : len(r)] = torch.tensor(r)
    cand = cand.to(device)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    out = torch.empty((len(prompts), len(responses)))
    for i, prompt in enumerate(prompts):
        first = model(
            input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1
        )
        logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        token_logp = torch.zeros((len(responses), width), device=device)
        token_logp[:, 0] = logp[cand[:, 0]]
        if width > 1:
            cache = first.past_key_values
            cache.batch_repeat_interleave(len(responses))
            rest = model(input_ids=cand[:, :-1], past_key_values=cache, use_cache=True).logits
            rest_logp = torch.log_softmax(rest.float(), dim=-1)
            token_logp[:, 1:] = rest_logp.gather(-1, cand[:, 1:, None]).squeeze(-1)
        out[i] = ((token_logp * valid).sum(dim=1) / lengths).cpu()
    model.train(was_training)
    return out


def evaluate_label_words(
    model: torch.nn.Module, words: LabelWords, data: LabelWordData, device: torch.device
) -> LabelWordResult:
    """Label-word accuracy, macro-F1 and the gold responses' mean loss on ``data``."""
    if not len(data):
        return LabelWordResult(float("nan"), float("nan"), float("nan"), 0, [])
    scores = score_rows(model, data.prompts, words.responses, device)
    pred = scores.argmax(dim=1).tolist()
    gold = data.gold
    loss = -float(scores[torch.arange(len(gold)), torch.tensor(gold)].mean())
    accuracy = float(np.mean(np.asarray(pred) == np.asarray(gold)))
    return LabelWordResult(loss, accuracy, macro_f1(gold, pred), len(gold), pred)


def check_decoder(model_dir: Path) -> None:
    """Refuse label words on an encoder (it cannot write a label); clear words, early."""
    from fedslm.models.families import FAMILIES

    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))[
            "model_type"
        ]
    except (OSError, ValueError, KeyError):
        return  # load_model reports an unreadable folder in its own words
    family = FAMILIES.get(model_type)
    if family is not None and family.kind == "encoder":
        raise ModelError(
            f"{model_dir}: task.classifier 'label-words' needs a generative (causal LM) model "
            f"that writes the label; {family.name} (model_type {model_type!r}) is an encoder. "
            "Use task.classifier 'head' with it, or a decoder such as model.name gemma3-270m"
        )
