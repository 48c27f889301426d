"""Calibration text loading/tokenization and the evaluation metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distill.hf import evaluate, text
from tests.hf.conftest import make_tokenizer, tiny_model


def test_default_corpus_ships_and_splits():
    texts = text.read_texts()
    sentences = text.split_sentences(texts)
    assert len(texts) >= 40 and len(sentences) > 3 * len(texts)
    assert all(s[-1] in ".!?" for s in sentences), "a sentence was cut in the middle"
    calib, held = text.split_holdout(sentences)
    assert len(held) == len(sentences) // 5 and not set(calib) & set(held)
    assert sorted(calib + held) == sorted(sentences)


def test_read_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first line\n\n  second line  \n")
    assert text.read_texts(plain) == ["first line", "second line"]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert text.read_texts(jl) == ["one", "two"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"body": "x"}\n', '"text" field'),
        ("not json\n", "not valid JSON"),
        ("\n\n", "holds no text"),
    ],
)
def test_bad_jsonl_raises(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        text.read_texts(f)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text.read_texts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="holdout_every"):
        text.split_holdout([1, 2, 3], holdout_every=1)
    with pytest.raises(ValueError, match="batch_size"):
        text.batches(torch.zeros(2, 3, dtype=torch.long), 0)


def test_causal_lm_blocks_pack_tokens_in_order():
    tok = make_tokenizer("gpt2")
    texts = text.read_texts()[:6]
    blocks = text.causal_lm_blocks(texts, tok, 16)
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.shape == (len(ids) // 16, 16)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    assert text.causal_lm_blocks(texts, tok, 16, max_blocks=2).shape == (2, 16)
    with pytest.raises(ValueError, match="seq_len"):
        text.causal_lm_blocks(["a b"], tok, 4096)


def test_encode_sentences_pads_and_masks():
    tok = make_tokenizer("bert")
    enc = text.encode_sentences(["The river rose.", "A compiler turns source code into instructions."], tok, 12)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 12)
    lengths = enc["attention_mask"].sum(1)
    assert lengths[0] < lengths[1]  # the short sentence is padded and its padding is masked
    assert (enc["input_ids"][0, lengths[0] :] == tok.pad_token_id).all()


def test_perplexity_matches_model_loss():
    lm = tiny_model("gpt2")
    blocks = torch.randint(0, 256, (5, 12))
    with torch.no_grad():
        # HF's loss is the mean over all predicted tokens; equal-length blocks make it the same mean
        loss = lm(input_ids=blocks, labels=blocks).loss.item()
    assert evaluate.perplexity(lm, blocks, batch_size=2) == pytest.approx(math.exp(loss), rel=1e-5)


def test_sentence_embeddings_are_masked_mean_pools():
    enc_model = tiny_model("bert")
    tok = make_tokenizer("bert")
    enc = text.encode_sentences(["Owls hunt mostly at night.", "Bees communicate with a dance, they say."], tok, 14)
    emb = evaluate.sentence_embeddings(enc_model, enc, batch_size=1)
    with torch.no_grad():
        h = enc_model(**enc).last_hidden_state
    for i in range(2):
        n = int(enc["attention_mask"][i].sum())
        want = F.normalize(h[i, :n].mean(0), dim=0)
        assert torch.allclose(emb[i], want, atol=1e-5)


def test_embedding_agreement():
    t = torch.randn(20, 8)
    same = evaluate.embedding_agreement(t, t * 3.0)  # scale does not matter
    assert same["mean_cosine"] == pytest.approx(1.0) and same["retrieval_top1"] == 1.0
    assert same["retrieval_top5_overlap"] == 1.0
    shuffled = evaluate.embedding_agreement(t, t[torch.randperm(20)])
    assert shuffled["mean_cosine"] < 0.9 and shuffled["retrieval_top1"] < 1.0
    with pytest.raises(ValueError, match="embeddings"):
        evaluate.embedding_agreement(t, t[:5])
