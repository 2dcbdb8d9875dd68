import itertools
import json

import pytest

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


def _marked_docs(path, n=3000):
    """A .jsonl of ``n`` documents, each naming itself (``doc17x``) a few times."""
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": " ".join([f"doc{i}x"] * 6) + " the cat sat."}) + "\n")


def _ids(text):
    import re

    return {int(m) for m in re.findall(r"doc(\d+)x", text)}


def test_local_files_split_by_document_hash_into_disjoint_train_and_heldout(tmp_path):
    f = tmp_path / "docs.jsonl"
    _marked_docs(f)
    train = list(data.documents(str(f), split="train"))
    held = list(data.documents(str(f), split="heldout"))
    assert set(train).isdisjoint(held) and len(train) + len(held) == 3000
    assert 0.004 < len(held) / 3000 < 0.02  # 1% by default
    assert all(data.is_heldout(d) for d in held) and not any(data.is_heldout(d) for d in train)
    assert held == list(data.documents(str(f), seed=9, split="heldout"))  # deterministic, seed-free
    wider = list(data.documents(str(f), split="heldout", heldout_frac=0.2))
    assert set(held) <= set(wider) and 0.15 < len(wider) / 3000 < 0.25


def test_training_stream_of_a_local_file_never_reads_a_heldout_document(tmp_path, model):
    f = tmp_path / "docs.jsonl"
    _marked_docs(f)
    held_ids = _ids(" ".join(data.documents(str(f), split="heldout")))
    assert held_ids
    seen = set()
    for b in data.token_batches(model.tokenizer, str(f), seq_len=64, batch_size=32):
        seen |= _ids(model.tokenizer.decode(b.flatten().tolist()))
    assert len(seen) > 2500 and seen.isdisjoint(held_ids)


def test_summary_of_a_local_file_run_is_scored_on_heldout_documents(tmp_path, model):
    from saekit.cli import main
    from saekit.training import TrainConfig
    from saekit.training.config import DataOptions, RunOptions
    from saekit.training.summary import eval_tokens
    from tests.test_training import TINY

    f = tmp_path / "docs.jsonl"
    _marked_docs(f)
    cfg = TrainConfig(data=DataOptions(dataset=str(f), heldout_frac=0.05), run=RunOptions(eval_tokens=2032))
    toks = eval_tokens(model, cfg)
    got = _ids(model.tokenizer.decode(toks.flatten().tolist()))
    held_ids = _ids(" ".join(data.documents(str(f), split="heldout", heldout_frac=0.05)))
    assert got and got <= held_ids
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(f), "--heldout-frac", "0.05", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"].startswith("local files") and "5.00%" in summary["eval_split"]
    assert summary["eval_tokens"] == len(toks) * 127


def test_a_source_without_heldout_text_is_a_one_line_error(tmp_path, model):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"text": "a single short document"}) + "\n")
    with pytest.raises(DataSourceError, match="held-out documents .* fill no"):
        data.heldout_sequences(model.tokenizer, str(f), 4, 32, seed=0)


@pytest.mark.parametrize("splits", [("train", "validation"), ("train", "test"), ("train",)])
def test_hub_datasets_score_on_their_heldout_split_or_on_hash_heldout_documents(monkeypatch, splits):
    """The real code path of a hub dataset, with `datasets`' two entry points stood in for
    (no network in tests): a validation (else test) split is the held-out text; a dataset
    with only "train" is split by document hash like local files."""
    import datasets

    rows = {s: [{"text": f"{s} document {i}"} for i in range(400)] for s in splits}
    streamed = []

    def load_dataset(name, split, streaming):
        streamed.append(split)
        return iter(rows[split])

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: list(splits))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data._hub_heldout_split.cache_clear()
    name = f"someone/corpus-{'-'.join(splits)}"
    held = list(data.documents(name, split="heldout", heldout_frac=0.1))
    train = list(data.documents(name, split="train", heldout_frac=0.1))
    if len(splits) == 2:
        assert held == [r["text"] for r in rows[splits[1]]] and streamed == [splits[1], "train"]
        assert len(train) == 400 and splits[1] in data.describe_heldout(name)
    else:
        assert set(held).isdisjoint(train) and len(held) + len(train) == 400 and 0 < len(held) < 80
        assert "hash" in data.describe_heldout(name)
    data._hub_heldout_split.cache_clear()
