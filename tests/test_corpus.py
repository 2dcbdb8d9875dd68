import itertools
import json

import pytest
import torch

from saekit import corpus, data
from saekit.errors import DataSourceError


def take(it, n):
    return list(itertools.islice(it, n))


def test_same_seed_same_text_and_different_seed_differs():
    a = take(corpus.stream_text(seed=3), 50)
    assert a == take(corpus.stream_text(seed=3), 50)
    assert a != take(corpus.stream_text(seed=4), 50)
    assert corpus.ioi_prompts(20, seed=1) == corpus.ioi_prompts(20, seed=1)


def test_corpus_has_the_promised_variety():
    assert len(set(corpus.NAMES)) >= 200
    assert len(corpus.TRAIN_TEMPLATES) + len(corpus.HELDOUT_TEMPLATES) >= 15
    text = " ".join(take(corpus.stream_text(0), 2000))
    assert sum(f" {n} " in text or f" {n}." in text for n in corpus.NAMES) >= 200
    assert "Again, the list was:" in text  # repeated spans for induction
    prompts = corpus.ioi_prompts(200, "train")
    assert {p.order for p in prompts} == {"ABB", "BAB"}
    for p in prompts[:50]:  # the answer is the name said once
        assert p.text.count(p.io) == 1 and p.text.count(p.s) == 2


def test_heldout_templates_and_pairs_never_in_training_text():
    text = " ".join(take(corpus.stream_text(0), 3000))
    for t in corpus.HELDOUT_TEMPLATES:
        probe = t.format(A="\0", B="\0", S="\0", place="\0", object="\0").split("\0")
        longest = max(probe, key=len).strip()
        assert len(longest) >= 10 and longest not in text, (t, longest)
    train = corpus.ioi_prompts(2000, "train")
    held = corpus.ioi_prompts(2000, "heldout")
    assert not any(corpus.pair_is_heldout(p.io, p.s) for p in train)
    assert all(corpus.pair_is_heldout(p.io, p.s) for p in held)
    assert {p.template for p in held} == set(range(len(corpus.HELDOUT_TEMPLATES)))


def test_pack_makes_bos_led_fixed_length_sequences(model):
    tok = model.tokenizer
    seqs = take(data.pack(corpus.stream_text(0), tok, 64), 10)
    assert all(s.shape == (64,) and s[0] == tok.bos_token_id for s in seqs)
    b = next(data.token_batches(tok, None, seq_len=32, batch_size=4))
    assert b.shape == (4, 32)


def test_local_txt_and_jsonl_sources(tmp_path, model):
    (tmp_path / "a.txt").write_text("first doc here.\n\nsecond doc there.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third doc"}) + "\n")
    assert take(data.documents(str(tmp_path)), 5) == ["first doc here.", "second doc there.", "third doc"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataSourceError, match="bad.jsonl:1"):
        take(data.documents(str(tmp_path / "bad.jsonl")), 1)
    with pytest.raises(DataSourceError, match="no such file"):
        data.documents("./missing.txt")


def test_every_ioi_word_is_one_token(model):
    tok = model.tokenizer
    bad = [w for w in corpus.vocabulary_words() if len(tok.encode(" " + w, add_special_tokens=False)) != 1]
    assert bad == []
