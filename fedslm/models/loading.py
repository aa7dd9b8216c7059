"""Load a base model and its tokenizer from a local folder and add the LoRA adapter.

Build order matters under DP (field notes): the model goes to its device first, then LoRA is
added, and only then are the optimizer and Opacus attached (in ``fedslm.privacy.dp_sgd``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedslm.batching import PromptTemplate
from fedslm.config import LoraConfig, ModelConfig
from fedslm.errors import ModelError
from fedslm.models.families import (
    ModelDefaults,
    check_new_weights_saved,
    check_per_sample_support,
    resolve_defaults,
    train_in_fp32,
    uses_conv1d,
)
from fedslm.models.pooled import build_mean_pool_classifier, label_name_rows
from fedslm.training import inner_model

# No code path may reach a model hub; this makes transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@dataclass
class LoadedModel:
    """A PEFT model with its tokenizer, task and labels, on its device.

    ``defaults`` says what was trained and how (family table + job overrides);
    ``prompt_template`` is how causal-LM pairs must be encoded for this model (None for
    classification): pass it to ``fedslm.batching.encode_instructions``.
    """

    model: torch.nn.Module  # peft.PeftModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    task: str
    labels: list[str]
    device: torch.device
    family: str
    defaults: ModelDefaults | None = None
    prompt_template: PromptTemplate | None = None


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
    options: ModelConfig | None = None,
) -> LoadedModel:
    """Load the base model at ``path`` for ``task`` and wrap it with a fresh LoRA adapter.

    ``seed`` fixes the adapter's (and classification head's) initialisation, so every site and
    the coordinator build the same starting point. LoRA targets, head, pad token and prompt
    template come from the model's family (``fedslm.models.families``), with the overrides in
    ``lora`` and ``options`` (the job's ``model`` section). Raises ``ModelError`` when the
    family is unknown and no targets are given, or when the result could not be trained
    privately or exported faithfully.
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
    defaults = resolve_defaults(family, task, tokenizer, lora, options, path)
    options = options or ModelConfig()
    torch.manual_seed(seed)
    model: Any  # a transformers model, then PEFT's wrapper of it
    if task == "classification" and options.pooling == "mean":
        model, info = build_mean_pool_classifier(path, len(labels), options.logit_scale)
        task_type = None  # a custom module: PEFT's generic PeftModel
    elif task == "classification":
        model, info = _from_pretrained(
            AutoModelForSequenceClassification,
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        task_type = TaskType.SEQ_CLS
    else:
        model, info = _from_pretrained(AutoModelForCausalLM, path)
        task_type = TaskType.CAUSAL_LM
    # decoders' classification heads find each row's last token by the pad id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    targets = list(defaults.lora_targets)
    # GPT-2 keeps its projections in Conv1D (weight stored transposed): LoRA must know
    if not defaults.fan_in_fan_out and uses_conv1d(model, defaults.lora_targets):
        defaults = replace(defaults, fan_in_fan_out=True)
    peft_config = PeftLoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=defaults.fan_in_fan_out,
        modules_to_save=list(defaults.head) or None,
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ModelError(
            f"{path}: lora.target_modules {targets} do not fit this model: {exc}"
        ) from None
    check_new_weights_saved(model, info["missing_keys"], path)
    train_in_fp32(model)
    if task == "classification":
        init_head(model, options.resolved_head_init, tokenizer, labels, device)
    check_per_sample_support(model, path)
    return LoadedModel(
        model, tokenizer, task, labels, device, family, defaults, defaults.prompt_template
    )


def _from_pretrained(auto_class: Any, path: Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``auto_class`` loaded from the local folder ``path`` (never the Hub), with transformers'
    loading report (its ``missing_keys``: head weights the checkpoint did not have)."""
    return auto_class.from_pretrained(
        path, local_files_only=True, output_loading_info=True, **kwargs
    )


def classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The trained copy of the mean-pooling classifier's linear layer inside a PEFT model."""
    head = inner_model(model).classifier
    # PEFT's ModulesToSaveWrapper: the copy that trains and is saved with the adapter
    return head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head


@torch.no_grad()
def init_head(
    model: torch.nn.Module, how: str, tokenizer, labels: list[str], device: torch.device
) -> None:
    """Start the classification head as ``model.head_init`` says (after PEFT wrapped it).

    'random' keeps the seeded initialisation; 'zero' and 'label-names' apply to the mean-pooling
    head only (the config refuses label-names otherwise; 'zero' with a family head zeroes its
    last linear layer, the one that maps to the labels).
    """
    if how == "random":
        return
    inner = inner_model(model)
    if hasattr(inner, "features"):
        head = classification_head(model)
    else:
        linears = [
            m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and m.out_features == len(labels)
            and ".modules_to_save." in f".{n}."
        ]
        if not linears:
            raise ModelError("model.head_init 'zero' found no trained linear layer to the labels")
        head = linears[-1]
    if head.bias is not None:
        head.bias.zero_()
    if how == "zero":
        head.weight.zero_()
        return
    head.weight.copy_(label_name_rows(inner, tokenizer, labels, device))


def quiet_transformers() -> None:
    """transformers prints a load report and progress bars per model; a site loads one model
    per process and its operators need fedslm's own lines, not these."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
