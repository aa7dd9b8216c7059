"""A site's memory for LoRA + DP-SGD, estimated from a model's shape: pure arithmetic.

What a site needs to hold during one training step, in bytes (every assumption is stated here
and in docs/models.md, which is generated from ``markdown_tables``):

- **weights**: every base parameter at the weights' dtype (fp32: 4 bytes, bf16: 2), frozen.
- **adapter**: the LoRA factors in fp32 (PEFT keeps adapters in fp32), their gradient and
  AdamW's two moments: 16 bytes per LoRA parameter.
- **per-sample gradients** (DP only): Opacus (hooks mode) holds one fp32 gradient per example
  for every LoRA parameter: ``batch x LoRA params x 4`` bytes.
- **activations**: what autograd keeps per token and layer to reach the LoRA factors of earlier
  layers, for a Llama-style block with frozen weights and fused attention (no ``seq x seq``
  matrix kept): the block input and the post-attention norm input (2h), the normed input that
  the LoRA A factors read (h), q, k, v and the attention output (2h + 2 kv), and the MLP's gate,
  up and activated gate (3 x intermediate). So ``5h + 2 kv + 3 i`` values per token per layer,
  at the weights' dtype. Frozen linear layers keep nothing of their own. This is close to the
  34·h bytes per token and layer of Korthikanti et al. (2022) at 16 bit.
- **logits** (causal LM): ``batch x seq x vocab`` at the weights' dtype, plus the fp32 copy
  fedslm's per-example loss makes, the log-softmax cross-entropy keeps, and its gradient:
  ``(dtype + 12)`` bytes per entry. With vocabularies of 128k-152k tokens this term dominates.

Not included: the Python/PyTorch runtime (about 1 GB of CPU memory, plus the CUDA context on a
GPU), the tokenised data set, allocator fragmentation, and the coordinator's copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Architecture:
    """The shape numbers the estimate needs (from a model's config.json)."""

    name: str
    params: float  # all parameters
    hidden: int
    layers: int
    vocab: int
    kv_dim: int  # width of the key/value projections (kv heads x head dim)
    intermediate: int  # MLP width


# Real checkpoints that stand for each size class; shapes from their config.json.
REFERENCE_MODELS: tuple[Architecture, ...] = (
    Architecture("0.1B: GPT-2", 124e6, 768, 12, 50257, 768, 3072),
    Architecture("0.5B: Qwen2.5-0.5B", 494e6, 896, 24, 151936, 128, 4864),
    Architecture("1B: Llama-3.2-1B", 1.24e9, 2048, 16, 128256, 512, 8192),
    Architecture("3B: Llama-3.2-3B", 3.21e9, 3072, 28, 128256, 1024, 8192),
    Architecture("8B: Llama-3.1-8B", 8.03e9, 4096, 32, 128256, 1024, 14336),
)


def architecture_from_config(config: dict, params: float, name: str = "") -> Architecture:
    """The estimate's shape numbers from a model's ``config.json`` (as a dict) and its
    parameter count; the different key names of the supported families are all read."""

    def first(*keys: str, default: int | None = None) -> int:
        for key in keys:
            if config.get(key) is not None:
                return int(config[key])
        if default is None:
            raise KeyError(f"config.json has none of {keys}")
        return default

    hidden = first("hidden_size", "n_embd", "dim", "d_model")
    heads = first("num_attention_heads", "n_head", "n_heads", "num_heads")
    head_dim = first("head_dim", default=hidden // heads)
    return Architecture(
        name=name or str(config.get("model_type", "")),
        params=params,
        hidden=hidden,
        layers=first("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        vocab=first("vocab_size"),
        kv_dim=first("num_key_value_heads", default=heads) * head_dim,
        intermediate=first("intermediate_size", "n_inner", "hidden_dim", default=4 * hidden),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component for one training step."""

    weights: float
    adapter: float
    per_sample_grads: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        """The sum of the components (runtime not included)."""
        return self.weights + self.adapter + self.per_sample_grads + self.activations + self.logits


def lora_params(arch: Architecture, r: int = 8) -> int:
    """LoRA parameters with fedslm's default targets (q and v projections) at rank ``r``:
    ``r x (in + out)`` per projection, q is ``h -> h`` and v is ``h -> kv``."""
    return arch.layers * r * ((arch.hidden + arch.hidden) + (arch.hidden + arch.kv_dim))


def estimate_site_memory(
    arch: Architecture,
    batch: int,
    seq_len: int = 512,
    r: int = 8,
    weight_bytes: int = 2,
    dp: bool = True,
    causal_lm: bool = True,
) -> MemoryEstimate:
    """Estimated memory of one LoRA training step (see the module docstring for the model).

    ``weight_bytes`` is 2 for bf16/fp16 weights, 4 for fp32; activations use the same dtype.
    ``dp`` adds Opacus' per-sample gradients. ``causal_lm`` adds the vocabulary-sized logits
    (a classification head's logits are negligible).
    """
    n_lora = lora_params(arch, r)
    tokens = batch * seq_len
    per_token_layer = 5 * arch.hidden + 2 * arch.kv_dim + 3 * arch.intermediate
    return MemoryEstimate(
        weights=arch.params * weight_bytes,
        adapter=16.0 * n_lora,
        per_sample_grads=4.0 * batch * n_lora if dp else 0.0,
        activations=float(arch.layers * tokens * per_token_layer * weight_bytes),
        logits=float(tokens * arch.vocab * (weight_bytes + 12)) if causal_lm else 0.0,
    )


def _gb(x: float) -> str:
    return f"{x / GB:.2f}" if x < 10 * GB else f"{x / GB:.1f}"


def markdown_tables(batches: tuple[int, ...] = (1, 8, 32), seq_len: int = 512, r: int = 8) -> str:
    """The tables for docs/models.md: totals per model, dtype and batch size, then the
    breakdown at one batch size."""
    lines = [
        f"Estimated memory of one DP-SGD step, GB: LoRA r={r} on q,v, causal LM, sequences of "
        f"{seq_len} tokens, AdamW; runtime (~1 GB) not included.",
        "",
        "| model | LoRA params | weights | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for arch in REFERENCE_MODELS:
        for wb, dtype in ((2, "bf16"), (4, "fp32")):
            cells = [_gb(estimate_site_memory(arch, b, seq_len, r, wb).total) for b in batches]
            lines.append(
                f"| {arch.name} | {lora_params(arch, r) / 1e6:.2f}M | {dtype} | "
                + " | ".join(cells)
                + " |"
            )
    mid = batches[len(batches) // 2]
    lines += [
        "",
        f"Where it goes at batch {mid}, bf16 weights (GB):",
        "",
        "| model | weights | adapter + AdamW | per-sample grads (DP) | activations | logits | "
        "total | without DP | classification (no LM logits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in REFERENCE_MODELS:
        e = estimate_site_memory(arch, mid, seq_len, r, 2)
        no_dp = estimate_site_memory(arch, mid, seq_len, r, 2, dp=False)
        cls = estimate_site_memory(arch, mid, seq_len, r, 2, causal_lm=False)
        lines.append(
            f"| {arch.name} | {_gb(e.weights)} | {_gb(e.adapter)} | {_gb(e.per_sample_grads)} "
            f"| {_gb(e.activations)} | {_gb(e.logits)} | {_gb(e.total)} | {_gb(no_dp.total)} "
            f"| {_gb(cls.total)} |"
        )
    return "\n".join(lines)
