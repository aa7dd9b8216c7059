"""The adapter as it travels and as it is saved: named float32 tensors, and a PEFT folder.

Only adapter tensors (LoRA factors, plus the classification head) ever leave a site. Names are
PEFT's own state-dict keys, so a saved adapter is a plain PEFT adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fedslm.errors import FederationError

AdapterState = dict[str, torch.Tensor]
METADATA_FILE = "fedslm_adapter.json"


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """The trainable adapter tensors as float32 CPU copies, keyed by PEFT's names."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Load ``state`` into the model's adapter after checking names and shapes match exactly."""
    from peft import set_peft_model_state_dict

    check_compatible(get_adapter_state(model), state)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FederationError(f"adapter tensors not used by the model: {unexpected[:5]}")


def freeze_lora_a(model: torch.nn.Module) -> int:
    """Freeze every LoRA A factor (FFA-LoRA); returns how many tensors were frozen.

    Every site builds A from the job seed, so a frozen A is the same everywhere and averaging
    the B factors alone is the exact average of the updates.
    """
    frozen = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise FederationError("aggregation 'ffa' needs LoRA A factors; the model has none")
    return frozen


def check_compatible(expected: AdapterState, state: AdapterState) -> None:
    """Raise ``FederationError`` naming the first tensor whose name, shape or values are wrong."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FederationError(
            "adapter tensor names do not match the job: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, ref in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise FederationError(
                f"adapter tensor {name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(got).all():
            raise FederationError(f"adapter tensor {name} has non-finite values")


def export_adapter(
    model: torch.nn.Module, state: AdapterState, out: Path, metadata: dict[str, Any]
) -> None:
    """Save ``state`` as a PEFT adapter folder at ``out``, atomically, with fedslm's metadata.

    ``adapter_config.json`` names the base model by ``metadata['base_model']['name']`` (portable),
    never by this machine's path; ``fedslm_adapter.json`` records what PEFT does not.
    """
    set_adapter_state(model, state)
    peft: Any = model  # PEFT's wrapper: its config and save_pretrained exist at run time
    peft_config = peft.peft_config["default"]
    original = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = metadata["base_model"]["name"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with warnings.catch_warnings():
            # PEFT looks for the base model's config under the portable name to see whether the
            # vocabulary changed; it did not (embeddings are frozen), so its warning is noise.
            warnings.filterwarnings("ignore", message="Could not find a config file")
            peft.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        peft_config.base_model_name_or_path = original
        shutil.rmtree(tmp, ignore_errors=True)


def load_exported(adapter_dir: Path, base_dir: Path) -> torch.nn.Module:
    """Load an exported adapter the way a stranger would: transformers + plain PEFT only."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedslm.models.loading import quiet_transformers

    quiet_transformers()  # its "classifier MISSING" report is expected: the adapter holds it
    meta = json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
    base: Any  # a transformers model: its config is typed only at run time
    if meta["task"] == "classification" and meta.get("pooling") == "mean":
        from fedslm.models.pooled import MeanPoolClassifier

        # the one class a stranger needs besides transformers and PEFT (docs/models.md)
        encoder = AutoModel.from_pretrained(base_dir, local_files_only=True)
        encoder.config.pad_token_id = meta.get("pad_token_id", encoder.config.pad_token_id)
        base = MeanPoolClassifier(encoder, meta["num_labels"], meta["logit_scale"])
    elif meta["task"] == "classification" and meta.get("classifier") != "label-words":
        id2label = {int(k): v for k, v in meta["id2label"].items()}
        base = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=meta["num_labels"], id2label=id2label, local_files_only=True
        )
        base.config.pad_token_id = meta.get("pad_token_id", base.config.pad_token_id)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    return PeftModel.from_pretrained(base, adapter_dir).eval()
