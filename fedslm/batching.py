"""Tokenised examples and the batches drawn from them.

Examples are tokenised once, unpadded; each batch is padded to its own longest row. Under DP
every batch is Poisson-sampled (each record joins independently with probability q), which is
what the accountant assumes, so batch sizes vary and a batch can be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedslm.errors import ModelError

IGNORE = -100  # label value the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class Encoded:
    """Token ids per example and, per example, a class id or per-token labels."""

    input_ids: list[list[int]]
    targets: list[int] | list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_classification(
    tokenizer, texts: list[str], labels: list[str], label_ids: dict[str, int], max_length: int
) -> Encoded:
    """Tokenise texts (truncated to ``max_length``) with their class ids."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, [label_ids[label] for label in labels], tokenizer.pad_token_id)


@dataclass(frozen=True)
class PromptTemplate:
    """How one prompt/response pair becomes a token sequence.

    ``chat``: the tokenizer's own chat template renders a user turn holding the prompt and an
    assistant turn holding the response; the response tokens are what the full conversation adds
    after the generation prompt (so they end with the template's own end-of-turn tokens).
    ``plain``: the prompt is put into ``text`` at ``{prompt}`` and tokenised with the
    tokenizer's special tokens (e.g. bos); the response follows, then eos. ``{prompt}`` alone is
    the prompt as written in the data.
    """

    kind: Literal["chat", "plain"]
    text: str = "{prompt}"

    def describe(self) -> str:
        """A short description for logs and metadata."""
        return "the checkpoint's chat template" if self.kind == "chat" else repr(self.text)

    def pair_ids(self, tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt part and of the response part (which carries the labels)."""
        if self.kind == "plain":
            p = tokenizer(self.text.replace("{prompt}", prompt))["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"]
            return p, [*r, tokenizer.eos_token_id]
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(head):
            # e.g. templates that rewrite earlier turns once an answer follows: the prompt tokens
            # seen in training would not be the ones the model is prompted with later
            raise ModelError(
                "the tokenizer's chat template renders the prompt differently once a response "
                "follows, so prompt and response cannot be separated; set model.prompt_template "
                "to a plain template such as '{prompt}'"
            )
        # the template writes its own special tokens (bos, turn markers): add none here
        p = tokenizer(head, add_special_tokens=False)["input_ids"]
        r = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        return p, r


RAW_PROMPT = PromptTemplate("plain", "{prompt}")


def encode_instructions(
    tokenizer,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    template: PromptTemplate | None = None,
) -> Encoded:
    """Tokenise prompt+response pairs; only response tokens (and the final eos or end-of-turn
    tokens) carry labels. ``template`` (default: the raw prompt) says how a pair is laid out.

    When a pair is too long the prompt is cut from the left, so the response is always learned.
    """
    template = template or RAW_PROMPT
    input_ids, targets = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p, r = template.pair_ids(tokenizer, prompt, response)
        r = r[: max_length - 1]
        p = p[-(max_length - len(r)) :] if len(p) + len(r) > max_length else p
        input_ids.append(p + r)
        targets.append([IGNORE] * len(p) + r)
    return Encoded(input_ids, targets, tokenizer.pad_token_id)


def collate(data: Encoded, index: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad the rows at ``index`` into a batch on ``device``."""
    rows = [data.input_ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    first = data.targets[index[0]]
    if isinstance(first, int):
        batch["labels"] = torch.tensor([data.targets[i] for i in index])
    else:
        lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for j, i in enumerate(index):
            t = data.targets[i]
            assert isinstance(t, list)  # the first row's labels are a list: every row's are
            lab[j, : len(t)] = torch.tensor(t)
        batch["labels"] = lab
    return {k: v.to(device) for k, v in batch.items()}


def poisson_batches(n: int, q: float, steps: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches, each record included independently with probability ``q``."""
    return [
        torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()
        for _ in range(steps)
    ]


def sequential_batches(n: int, size: int) -> list[list[int]]:
    """Consecutive fixed-size batches over all rows, for evaluation."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
