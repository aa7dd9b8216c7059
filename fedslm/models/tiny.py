"""Tiny random models built offline, for tests and smoke runs.

They are real transformers architectures (``tiny-bert``, ``tiny-llama``, and ``tiny-<model_type>``
for every family in ``fedslm.models.families``) with a tokenizer made here from the synthetic
corpus, saved with ``save_pretrained`` so that they load exactly like a checkpoint a site would
stage. Encoders get a WordPiece tokenizer (its vocabulary the corpus' words), decoders a
byte-level BPE one (trained). Built once per cache folder, atomically, and the same on every
build for a seed (tests/models/test_families.py builds tiny-bert twice and compares).

Each tiny decoder mimics what its family's real checkpoints ship, because that is what the
family defaults have to cope with: GPT-2, GPT-Neo, GPT-J, Mistral and Phi tokenizers have no
pad token; Qwen2, Phi-3 and Gemma (1, 2 and 3) tokenizers ship a chat template (with its special
tokens).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

VERSION = "v2"  # bump when the recipe changes, so old caches are not reused
# The family models' own recipe version, separate so that changing them never rebuilds (or
# changes) tiny-bert and tiny-llama, which other tests pin.
FAMILY_VERSION = "v2"

# Sizes shared by every tiny family model: 2 layers, hidden 64, 4 heads of 16.
_HIDDEN, _LAYERS, _HEADS, _FFN, _POSITIONS = 64, 2, 4, 128, 256
_WORDPIECE_VOCAB = 2000


def ensure_tiny_model(name: str, root: Path) -> Path:
    """Return the folder of tiny model ``name``, building it the first time."""
    version = VERSION if name in ("tiny-bert", "tiny-llama") else FAMILY_VERSION
    target = root / f"{name}-{version}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_tiny_model(name, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(name: str, out: Path, seed: int = 0) -> None:
    """Build tiny model ``name`` ('tiny-bert', 'tiny-llama' or 'tiny-<model_type>' for any name
    in ``TINY_MODELS``) into ``out``."""
    from fedslm.data.synthetic import corpus_for_tokenizer

    corpus = corpus_for_tokenizer(seed=seed)
    torch.manual_seed(seed)
    model: PreTrainedModel
    config: PretrainedConfig
    if name == "tiny-bert":
        from transformers import BertConfig, BertModel

        tok = _wordpiece_tokenizer(corpus)
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        )
        # saved as a bare encoder with its pooler, like MiniLM, so every head loads the same
        model = BertModel(config)
    elif name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = _bpe_tokenizer(corpus)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif name in _FAMILY_BUILDERS:
        model, tok = _FAMILY_BUILDERS[name](corpus)
    else:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    model.save_pretrained(out)
    tok.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# One builder per family. Encoders are saved as the bare encoder (like MiniLM and tiny-bert), so
# that only the classification head is new when they load for a task; decoders are saved with
# their LM head, so they load both as a causal LM and (with a new ``score`` head) as a classifier.


def _tiny_distilbert(corpus: list[str]):  # -> (model, tokenizer)
    from transformers import DistilBertConfig, DistilBertModel

    tok = _wordpiece_tokenizer(corpus)
    config = DistilBertConfig(
        vocab_size=len(tok),
        dim=_HIDDEN,
        n_layers=_LAYERS,
        n_heads=_HEADS,
        hidden_dim=_FFN,
        max_position_embeddings=_POSITIONS,
        pad_token_id=tok.pad_token_id,
    )
    return DistilBertModel(config), tok


def _tiny_mobilebert(corpus: list[str]):
    from transformers import MobileBertConfig, MobileBertModel

    tok = _wordpiece_tokenizer(corpus)
    # MobileBERT's bottleneck (hidden 64 -> 32 inside each block) and trigram input embedding
    # are kept, scaled down, because they are what makes it differ from BERT.
    config = MobileBertConfig(
        vocab_size=len(tok),
        hidden_size=_HIDDEN,
        embedding_size=32,
        intra_bottleneck_size=32,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        intermediate_size=_HIDDEN,
        num_feedforward_networks=2,
        max_position_embeddings=_POSITIONS,
        pad_token_id=tok.pad_token_id,
    )
    return MobileBertModel(config), tok


def _decoder_config_ids(tok) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _llama_like(config_cls_name: str, model_cls_name: str, tok, **extra):
    import transformers

    config = getattr(transformers, config_cls_name)(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=2,
        intermediate_size=_FFN,
        max_position_embeddings=_POSITIONS,
        tie_word_embeddings=False,
        **_decoder_config_ids(tok),
        **extra,
    )
    return getattr(transformers, model_cls_name)(config), tok


def _tiny_qwen2(corpus: list[str]):
    return _llama_like("Qwen2Config", "Qwen2ForCausalLM", _chat_bpe(corpus, "chatml"))


def _tiny_mistral(corpus: list[str]):
    return _llama_like("MistralConfig", "MistralForCausalLM", _bpe_without_pad(corpus), head_dim=16)


def _tiny_phi(corpus: list[str]):
    # Phi-2 style: parallel attention+MLP block, partial rotary (half of each head), LayerNorm
    return _llama_like("PhiConfig", "PhiForCausalLM", _bpe_without_pad(corpus))


def _tiny_phi3(corpus: list[str]):
    # Phi-3 fuses q,k,v into one qkv_proj and gate,up into gate_up_proj
    return _llama_like("Phi3Config", "Phi3ForCausalLM", _chat_bpe(corpus, "phi3"))


def _tiny_gemma(corpus: list[str]):
    import transformers

    tok = _chat_bpe(corpus, "gemma")
    # Gemma ties the LM head to the embeddings, like the real checkpoints
    config = transformers.GemmaConfig(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=_FFN,
        max_position_embeddings=_POSITIONS,
        **_decoder_config_ids(tok),
    )
    return transformers.GemmaForCausalLM(config), tok


def _tiny_gemma2(corpus: list[str]):
    import transformers

    tok = _chat_bpe(corpus, "gemma")
    # sliding window smaller than max_length in tests would change nothing; keep Gemma 2's
    # alternating local/global layers and its logit soft-capping, which do matter
    config = transformers.Gemma2Config(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=_FFN,
        max_position_embeddings=_POSITIONS,
        sliding_window=8,
        **_decoder_config_ids(tok),
    )
    return transformers.Gemma2ForCausalLM(config), tok


def _tiny_gemma3_text(corpus: list[str]):
    import transformers

    tok = _chat_bpe(corpus, "gemma")
    # Gemma 3: q/k RMSNorm, local (sliding) and global layers with their own rotary bases, tied
    # embeddings scaled by sqrt(hidden); a window below the tests' lengths keeps the local
    # layers' masking in play
    config = transformers.Gemma3TextConfig(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=_FFN,
        max_position_embeddings=_POSITIONS,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        **_decoder_config_ids(tok),
    )
    return transformers.Gemma3ForCausalLM(config), tok


def _tiny_gpt2(corpus: list[str]):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _bpe_without_pad(corpus)
    config = GPT2Config(
        n_embd=_HIDDEN,
        n_layer=_LAYERS,
        n_head=_HEADS,
        n_positions=_POSITIONS,
        **_decoder_config_ids(tok),
    )
    return GPT2LMHeadModel(config), tok


def _tiny_gpt_neo(corpus: list[str]):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tok = _bpe_without_pad(corpus)
    config = GPTNeoConfig(
        hidden_size=_HIDDEN,
        num_layers=_LAYERS,
        num_heads=_HEADS,
        intermediate_size=_FFN,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=_POSITIONS,
        **_decoder_config_ids(tok),
    )
    return GPTNeoForCausalLM(config), tok


def _tiny_gptj(corpus: list[str]):
    from transformers import GPTJConfig, GPTJForCausalLM

    tok = _bpe_without_pad(corpus)
    config = GPTJConfig(
        n_embd=_HIDDEN,
        n_layer=_LAYERS,
        n_head=_HEADS,
        rotary_dim=8,
        n_positions=_POSITIONS,
        **_decoder_config_ids(tok),
    )
    return GPTJForCausalLM(config), tok


_FAMILY_BUILDERS = {
    "tiny-distilbert": _tiny_distilbert,
    "tiny-mobilebert": _tiny_mobilebert,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-mistral": _tiny_mistral,
    "tiny-phi": _tiny_phi,
    "tiny-phi3": _tiny_phi3,
    "tiny-gemma": _tiny_gemma,
    "tiny-gemma2": _tiny_gemma2,
    "tiny-gemma3_text": _tiny_gemma3_text,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-gpt_neo": _tiny_gpt_neo,
    "tiny-gptj": _tiny_gptj,
}

# Every tiny model by name: 'tiny-' + the model_type it is built from.
TINY_MODELS: tuple[str, ...] = ("tiny-bert", "tiny-llama", *_FAMILY_BUILDERS)


def _wordpiece_tokenizer(corpus: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Not tokenizers' WordPiece trainer: it breaks ties between merges in hash-map order, which
    # is random per process, so two builds of tiny-bert had vocabularies ~30 tokens apart and a
    # test's figures changed from one session to the next. Whole words by frequency (then
    # alphabetically) after every character and its "##" continuation: the same vocabulary on
    # every build, and any word still splits into characters.
    counts = Counter(
        word
        for text in corpus
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    words = sorted((w for w in counts if w not in chars), key=lambda w: (-counts[w], w))
    tokens = [*special, *chars, *(f"##{c}" for c in chars), *words][:_WORDPIECE_VOCAB]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=256,
    )


# Minimal chat templates in the real families' formats, with the special tokens they use.
_CHAT_FORMATS: dict[str, tuple[list[str], str]] = {
    "chatml": (  # Qwen2 / Qwen2.5 (and SmolLM2) instruct
        ["<|im_start|>", "<|im_end|>"],
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
    "phi3": (
        ["<|user|>", "<|assistant|>", "<|end|>"],
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    ),
    "gemma": (
        ["<start_of_turn>", "<end_of_turn>"],
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
        "{% endif %}",
    ),
}


def _bpe_without_pad(corpus: list[str]):  # -> PreTrainedTokenizerFast
    """The decoder tokenizer with no pad token, like GPT-2's, Llama 3's or Mistral's: the
    family default has to supply one."""
    tok = _bpe_tokenizer(corpus)
    tok.pad_token = None
    return tok


def _chat_bpe(corpus: list[str], fmt: str):  # -> PreTrainedTokenizerFast
    """The decoder tokenizer with a chat template and its special tokens, like an instruct
    checkpoint's."""
    tok = _bpe_tokenizer(corpus)
    specials, template = _CHAT_FORMATS[fmt]
    tok.backend_tokenizer.add_special_tokens(specials)
    tok.chat_template = template
    return tok


def _bpe_tokenizer(corpus: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        BpeTrainer(
            vocab_size=2000,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
    )
