"""Load a base model and its tokenizer from a local folder and add the LoRA adapter.

Build order matters under DP (field notes): the model goes to its device first, then LoRA is
added, and only then are the optimizer and Opacus attached (in ``fedslm.privacy.dp_sgd``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedslm.config import LoraConfig
from fedslm.errors import ModelError

# No code path may reach a model hub; this makes transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# LoRA targets per model family (model_type in config.json)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
}


@dataclass
class LoadedModel:
    """A PEFT model with its tokenizer, task and labels, on its device."""

    model: torch.nn.Module  # peft.PeftModel
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    task: str
    labels: list[str]
    device: torch.device
    family: str


def select_device(preference: str = "auto") -> torch.device:
    """``cuda`` when asked for or available under ``auto``, else ``cpu``."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is available; use 'auto'")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_model(
    path: Path,
    task: str,
    lora: LoraConfig,
    labels: list[str],
    device: torch.device,
    seed: int,
) -> LoadedModel:
    """Load the base model at ``path`` for ``task`` and wrap it with a fresh LoRA adapter.

    ``seed`` fixes the adapter's (and classification head's) initialisation, so every site and
    the coordinator build the same starting point.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load model config or tokenizer: {exc}") from None
    family = config.model_type
    targets = lora.target_modules or DEFAULT_TARGETS.get(family)
    if targets is None:
        raise ModelError(
            f"{path}: no LoRA defaults for model family {family!r}; set lora.target_modules "
            "to the names of its attention projection layers"
        )
    if tokenizer.pad_token is None:
        # decoders often ship without a pad token; eos is masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            local_files_only=True,
        )
        task_type = TaskType.SEQ_CLS
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        task_type = TaskType.CAUSAL_LM
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    peft_config = PeftLoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ModelError(
            f"{path}: lora.target_modules {targets} do not fit this model: {exc}"
        ) from None
    return LoadedModel(model, tokenizer, task, labels, device, family)


def quiet_transformers() -> None:
    """transformers prints a load report and progress bars per model; a site loads one model
    per process and its operators need fedslm's own lines, not these."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
