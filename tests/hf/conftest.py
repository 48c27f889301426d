"""Tiny offline Hugging Face models and tokenizers for the distill/hf tests (no hub access, no downloads)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from distill.hf.models import build_from_config  # noqa: E402
from distill.hf.text import read_texts, split_sentences  # noqa: E402

# the token ids every tiny model shares (the tokenizer below puts [PAD] at 0 and <eos> at 1)
_TOKENS = dict(vocab_size=256, pad_token_id=0)
_DECODER_TOKENS = dict(_TOKENS, bos_token_id=1, eos_token_id=1)
TINY = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=4, n_inner=64, n_positions=64, **_DECODER_TOKENS),
    "bert": dict(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        **_TOKENS,
    ),
    "roberta": dict(  # BERT's layout; positions start after the padding index, as RoBERTa's do
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
        **_TOKENS,
    ),
    "xlm-roberta": dict(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
        **_TOKENS,
    ),
    "distilbert": dict(n_layers=3, dim=32, n_heads=4, hidden_dim=64, max_position_embeddings=64, **_TOKENS),
    "llama": dict(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        num_key_value_heads=2,  # grouped-query attention, as Llama 2/3 and Mistral
        **_DECODER_TOKENS,
    ),
}  # fmt: skip


def make_tokenizer(family: str):
    """A word-level tokenizer trained on the embedded corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<eos>", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        split_sentences(read_texts()),
        trainers.WordLevelTrainer(vocab_size=TINY[family]["vocab_size"], special_tokens=specials),
    )
    if family in ("bert", "roberta", "xlm-roberta", "distilbert"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<eos>")


@pytest.fixture(params=["gpt2", "bert", "roberta", "xlm-roberta", "distilbert", "llama"])
def family(request) -> str:
    return request.param


def tiny_model(family: str, causal_lm: bool | None = None):
    return build_from_config(family, causal_lm=causal_lm, **TINY[family])


@pytest.fixture
def tiny_dir(tmp_path, family):
    """A local model folder (config.json + weights + tokenizer) of a tiny random ``family`` model."""
    d = tmp_path / f"tiny-{family}"
    tiny_model(family).save_pretrained(d)
    make_tokenizer(family).save_pretrained(d)
    return d
