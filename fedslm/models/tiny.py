"""Tiny random models built offline, for tests and smoke runs.

They are real transformers architectures (BERT, Llama) with a tokenizer trained here on the
synthetic corpus, saved with ``save_pretrained`` so that they load exactly like a checkpoint a
site would stage. Built once per cache folder, atomically, and deterministic by seed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

VERSION = "v1"  # bump when the recipe changes, so old caches are not reused


def ensure_tiny_model(name: str, root: Path) -> Path:
    """Return the folder of tiny model ``name``, building it the first time."""
    target = root / f"{name}-{VERSION}"
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
    """Build tiny model ``name`` ('tiny-bert' or 'tiny-llama') into ``out``."""
    from fedslm.data.synthetic import corpus_for_tokenizer

    corpus = corpus_for_tokenizer(seed=seed)
    torch.manual_seed(seed)
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
    else:
        raise ValueError(f"unknown tiny model {name!r}")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _wordpiece_tokenizer(corpus: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus, WordPieceTrainer(vocab_size=2000, special_tokens=special))
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
