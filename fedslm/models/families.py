"""Per-family defaults: what fedslm trains in each kind of small model, and how.

A model's family is the ``model_type`` in its ``config.json``. ``FAMILIES`` is the one table a
reader scans: LoRA targets, classification head, and the plain prompt template of each family.
Everything in it can be overridden in the job config (``lora.target_modules``,
``model.head_modules``, ``model.prompt_template``, ``model.pad_token``); ``resolve_defaults``
applies the overrides and refuses what cannot work.

Rules that hold for every family (and why):

- Padding is on the right, always. Real tokens then sit at positions 0..n-1 whatever the batch,
  so an example's output (and its gradient) does not depend on the other rows of its batch,
  which DP-SGD's per-example sensitivity needs. Left padding with the default position ids
  shifts every shorter row's positions by the batch's longest row.
- A tokenizer without a pad token pads with eos (``model.pad_token`` picks another token that
  is already in the vocabulary). Padding is masked out of attention and of the loss, and the
  decoders' classification heads read the last non-pad token.
- Only LoRA factors and the classification head are trained, and only in ``nn.Linear`` layers
  (Opacus computes their per-sample gradients in hooks mode). Embeddings, norms and every base
  weight stay frozen; ``check_per_sample_support`` refuses anything else rather than let Opacus
  fall back to another code path silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedslm.batching import PromptTemplate
from fedslm.config import LoraConfig, ModelConfig
from fedslm.errors import ModelError

TASKS = ("classification", "causal-lm")
PADDING_SIDE = "right"


@dataclass(frozen=True)
class Family:
    """Defaults for one model family (one ``model_type``)."""

    name: str  # what people call it
    kind: Literal["encoder", "decoder"]  # encoders: classification only
    lora_targets: tuple[str, ...]  # module names LoRA wraps (attention projections)
    head: tuple[str, ...]  # classification head: trained in full, saved with the adapter
    plain_template: str = "{prompt}"  # causal LM, when the tokenizer has no chat template
    conv1d: bool = False  # targets are transformers' Conv1D: LoRA needs fan_in_fan_out=True
    notes: str = ""  # what is special about this family under LoRA + Opacus

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks fedslm supports for this family."""
        return ("classification",) if self.kind == "encoder" else TASKS


_BERT_HEAD = ("classifier",)
MEAN_POOL_HEAD = ("classifier",)  # fedslm.models.pooled.MeanPoolClassifier's linear layer
_DECODER_HEAD = ("score",)
_GEMMA_TURNS = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"

# fmt: off
FAMILIES: dict[str, Family] = {
    # encoders (classification)
    "bert": Family("BERT, MiniLM", "encoder", ("query", "value"), _BERT_HEAD,
                   notes="the pooler comes from the checkpoint and stays frozen"),
    "distilbert": Family("DistilBERT", "encoder", ("q_lin", "v_lin"),
                         ("pre_classifier", "classifier"),
                         notes="its head has two new layers; both are trained and saved"),
    "mobilebert": Family("MobileBERT", "encoder", ("query", "value"), _BERT_HEAD,
                         notes="NoNorm layers (no Opacus grad sampler) stay frozen"),
    # decoders (causal LM; classification with a new `score` head)
    "qwen2": Family("Qwen2, Qwen2.5", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD),
    "llama": Family("Llama 2/3.x, SmolLM", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD),
    "phi": Family("Phi-1.5, Phi-2", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD,
                  plain_template="Instruct: {prompt}\nOutput:",
                  notes="plain template: the QA format of the Phi-2 model card"),
    "phi3": Family("Phi-3, Phi-3.5", "decoder", ("qkv_proj",), _DECODER_HEAD,
                   plain_template="<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
                   notes="q, k, v are one fused qkv_proj: LoRA adapts all three together"),
    "gemma": Family("Gemma", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD,
                    plain_template=_GEMMA_TURNS,
                    notes="GemmaRMSNorm (no Opacus grad sampler) and the tied embeddings stay "
                          "frozen"),
    "gemma2": Family("Gemma 2", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD,
                     plain_template=_GEMMA_TURNS,
                     notes="as Gemma; soft-capping and sliding-window layers change nothing"),
    "gemma3_text": Family("Gemma 3 (text: 270M, 1B)", "decoder", ("q_proj", "v_proj"),
                          _DECODER_HEAD, plain_template=_GEMMA_TURNS,
                          notes="as Gemma 2; its q/k RMSNorms stay frozen; the tokenizer's own "
                                "<pad> pads"),
    "mistral": Family("Mistral", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD,
                      plain_template="[INST] {prompt} [/INST]"),
    "gpt2": Family("GPT-2", "decoder", ("c_attn",), _DECODER_HEAD, conv1d=True,
                   notes="c_attn is a Conv1D holding q, k and v (LoRA with fan_in_fan_out); "
                         "the LoRA factors themselves are nn.Linear"),
    "gpt_neo": Family("GPT-Neo", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD),
    "gptj": Family("GPT-J", "decoder", ("q_proj", "v_proj"), _DECODER_HEAD),
}
# fmt: on


# what PEFT trains as the head of a sequence classifier when it is not told (modules_to_save)
PEFT_HEAD = ("classifier", "score")


def default_head(model_type: str, pooling: str) -> tuple[str, ...]:
    """The classification head a job trains (and sends) unless ``model.head_modules``
    overrides it: the mean-pooling classifier, the family's head, or PEFT's own for a family
    without defaults. A site policy allows more only by ``allowed_head_modules``."""
    if pooling == "mean":
        return MEAN_POOL_HEAD
    family = FAMILIES.get(model_type)
    return family.head if family is not None else PEFT_HEAD


@dataclass(frozen=True)
class ModelDefaults:
    """What ``load_model`` uses for one model and task: the family's defaults with the job's
    overrides applied. Recorded so a run says exactly what it trained."""

    family: str  # model_type
    known: bool  # False: a family fedslm has no table entry for (targets were given)
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool
    head: tuple[str, ...]  # empty for causal LM
    padding_side: str
    pad_token: str | None  # None: keep the tokenizer's own
    prompt_template: PromptTemplate | None  # causal LM only

    def describe(self) -> dict[str, object]:
        """JSON-friendly summary (for logs and adapter metadata)."""
        return {
            "family": self.family,
            "lora_targets": list(self.lora_targets),
            "fan_in_fan_out": self.fan_in_fan_out,
            "head": list(self.head),
            "padding_side": self.padding_side,
            "pad_token": self.pad_token,
            "prompt_template": None
            if self.prompt_template is None
            else {"kind": self.prompt_template.kind, "text": self.prompt_template.text},
        }


def resolve_defaults(
    model_type: str,
    task: str,
    tokenizer,
    lora: LoraConfig,
    options: ModelConfig | None,
    source: Path | str,
) -> ModelDefaults:
    """The family's defaults for ``task``, with the job's overrides. Sets the tokenizer's pad
    token and padding side in place (so every tokenizer call fedslm makes pads the same way).

    Raises ``ModelError`` for a family without defaults when ``lora.target_modules`` is not
    set, for an encoder asked to be a causal LM, and for a pad token or prompt template that
    this tokenizer cannot provide. ``source`` (the model folder) names the model in errors.
    """
    family = FAMILIES.get(model_type)
    overrides = options or ModelConfig()
    if family is None and lora.target_modules is None:
        raise unknown_family_error(model_type, source)
    if family is not None and task not in family.tasks:
        raise ModelError(
            f"{source}: {family.name} (model_type {model_type!r}) is an encoder; fedslm "
            "fine-tunes it for task.type 'classification' only, not 'causal-lm'"
        )
    targets = tuple(lora.target_modules or (family.lora_targets if family else ()))
    head: tuple[str, ...] = ()
    if task == "classification":
        # mean pooling brings its own head (fedslm.models.pooled); 'model' uses the family's
        own = MEAN_POOL_HEAD if overrides.pooling == "mean" else (family.head if family else ())
        head = tuple(overrides.head_modules or own)
    pad = _set_pad_token(tokenizer, overrides.pad_token, source)
    tokenizer.padding_side = PADDING_SIDE
    template = None
    if task == "causal-lm":
        plain = family.plain_template if family else "{prompt}"
        template = resolve_prompt_template(tokenizer, overrides.prompt_template, plain, source)
    return ModelDefaults(
        family=model_type,
        known=family is not None,
        lora_targets=targets,
        # the family's claim; load_model also looks at the layers, for overridden targets
        fan_in_fan_out=bool(family and family.conv1d and lora.target_modules is None),
        head=head,
        padding_side=PADDING_SIDE,
        pad_token=pad,
        prompt_template=template,
    )


def unknown_family_error(model_type: str, source: Path | str) -> ModelError:
    """The error for a model family fedslm has no defaults for, saying what to set."""
    known = ", ".join(sorted(FAMILIES))
    return ModelError(
        f"{source}: fedslm has no defaults for model family {model_type!r} (model_type in its "
        "config.json). Set lora.target_modules to the names of its attention projection "
        "layers (e.g. [q_proj, v_proj]); the other family settings have generic defaults you "
        "can override with model.head_modules (classification head, default: PEFT's "
        "'classifier'/'score'), model.prompt_template and model.pad_token. Padding is always "
        f"on the right. Families with defaults: {known}. See docs/models.md."
    )


def resolve_prompt_template(
    tokenizer, override: str | None, plain: str, source: Path | str
) -> PromptTemplate:
    """``override`` ('chat' or a plain template), else the checkpoint's chat template when the
    tokenizer ships one, else the family's ``plain`` template."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if override == "chat" and not has_chat:
        raise ModelError(
            f"{source}: model.prompt_template is 'chat' but the tokenizer ships no chat "
            "template; give a plain template with '{prompt}' instead"
        )
    if override == "chat" or (override is None and has_chat):
        return PromptTemplate("chat")
    return PromptTemplate("plain", override or plain)


def _set_pad_token(tokenizer, override: str | None, source: Path | str) -> str | None:
    """Make sure the tokenizer can pad. Returns the token chosen here (None: its own)."""
    if override is not None:
        # a new token would need a new embedding row, and embeddings stay frozen
        if override not in tokenizer.get_vocab():
            raise ModelError(
                f"{source}: model.pad_token {override!r} is not in the tokenizer's vocabulary; "
                "choose an existing token (e.g. its eos token)"
            )
        tokenizer.pad_token = override
        return override
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise ModelError(
            f"{source}: the tokenizer has neither a pad nor an eos token; set model.pad_token "
            "to a token of its vocabulary"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.eos_token


def uses_conv1d(model: torch.nn.Module, targets: tuple[str, ...]) -> bool:
    """Whether any layer named by ``targets`` is transformers' Conv1D (GPT-2 style, weight
    stored transposed), for which LoRA needs ``fan_in_fan_out=True``."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, m in model.named_modules()
    )


def train_in_fp32(model: torch.nn.Module) -> list[str]:
    """Keep every trainable tensor in float32, also when the checkpoint is bf16/fp16.

    Transformers 5 loads a checkpoint in its own dtype (most current decoders ship bf16). PEFT
    keeps LoRA factors in fp32 but copies the classification head in the base dtype, where
    AdamW steps, DP noise and the fp32 round trip through the coordinator would all be rounded
    to 8 bits of mantissa. Such a layer is cast to fp32 and its inputs are cast on the way in
    (Opacus records the cast inputs, so per-sample gradients are fp32 too). Returns the names of
    the layers cast.
    """
    cast = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and any(p.dtype != torch.float32 for p in own):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)
            cast.append(name)
    return cast


def _inputs_to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def check_per_sample_support(model: torch.nn.Module, source: Path | str) -> None:
    """Refuse a model whose trainable tensors Opacus would not handle in hooks mode.

    Opacus computes per-sample gradients with a hand-written rule per layer type and silently
    switches to functorch for any other layer that has trainable tensors; embeddings have open
    issues. fedslm's guarantee is checked for LoRA and heads on ``nn.Linear`` (and layers of the
    types Opacus has rules for), so anything else trainable is an error here, before a step is
    taken, never a quiet change of method.
    """
    from opacus import GradSampleModule

    supported = set(GradSampleModule.GRAD_SAMPLERS) - {torch.nn.Embedding, torch.nn.EmbeddingBag}
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in supported:
            raise ModelError(
                f"{source}: trainable tensor '{name}.{own[0]}' sits in a "
                f"{type(module).__name__} layer, for which Opacus has no per-sample gradient "
                "rule fedslm relies on (embeddings are never trained). Train only LoRA on "
                "Linear/Conv1D projections and Linear heads: remove it from "
                "lora.target_modules or model.head_modules."
            )


def check_new_weights_saved(
    model: torch.nn.Module, missing: set[str] | list[str], source: Path | str
) -> None:
    """Refuse weights that loading initialised at random (not in the checkpoint) but that would
    be neither trained nor saved with the adapter.

    Such a layer (e.g. DistilBERT's ``pre_classifier`` if the head were only ``classifier``)
    trains fine but stays random, and a fresh load of base model + adapter draws other random
    values: the exported adapter would not reproduce the trained model.
    """
    from peft import get_peft_model_state_dict

    saved = set(get_peft_model_state_dict(model))
    lost = sorted(k for k in missing if not any(s.endswith(f".{k}") or s == k for s in saved))
    if lost:
        module = lost[0].rsplit(".", 1)[0]
        raise ModelError(
            f"{source}: weights {lost[:4]} are not in the checkpoint, so they start random, and "
            "they would not be trained or saved with the adapter; add "
            f"'{module.rsplit('.', 1)[-1]}' to model.head_modules"
        )


def family_rows() -> list[list[str]]:
    """The family table as rows (model_type, family, tasks, LoRA targets, head, plain
    template, notes), for docs/models.md."""
    rows = []
    for model_type, f in FAMILIES.items():
        targets = ", ".join(f.lora_targets) + (" (Conv1D, fan_in_fan_out)" if f.conv1d else "")
        rows.append(
            [
                f"`{model_type}`",
                f.name,
                ", ".join(f.tasks),
                targets,
                ", ".join(f.head),
                # a '|' inside a Markdown table cell ends the cell, even in code
                "—" if f.kind == "encoder" else f"`{f.plain_template!r}`".replace("|", "\\|"),
                f.notes or "—",
            ]
        )
    return rows
