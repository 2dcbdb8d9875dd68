"""Token streams: saekit's corpus, a Hugging Face dataset, or local files, packed into
fixed-length sequences that each start with BOS.

A *source* is named by a string:
- ``None`` or ``"saekit"``: saekit's own generated corpus (``saekit.corpus``), offline;
- ``"ioi"``: completed IOI prompts only (``saekit.corpus.ioi_documents``), offline;
- a path to a ``.txt`` file (one document per blank-line-separated block), a ``.jsonl``
  file (one JSON object per line with a ``"text"`` field), or a folder of such files;
- anything else: a Hugging Face dataset name, streamed with ``datasets`` (needs network).

Held-out means held out for every source (``split="heldout"``; what scores a run's summary,
``saekit eval`` and ``saekit analyze``): saekit's corpus and ``ioi`` generate their own
held-out streams; a hub dataset with a ``validation`` (or else ``test``) split is scored
on that split and trained on ``train``; local files and single-split hub datasets are split
by document: a document whose stable hash (BLAKE2b of its text) falls below ``heldout_frac``
(default 1%) is held out and never trained on. ``describe_heldout`` says which rule applies.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import torch

from saekit import corpus
from saekit.errors import DataSourceError


def _local_documents(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataSourceError(f"no .txt or .jsonl files under {path}; add some or pass another --dataset")
    for f in files:
        if f.suffix == ".jsonl":
            with f.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataSourceError(
                                f"{f}:{lineno} is not a JSON object with a 'text' field"
                            ) from None
        elif f.suffix == ".txt":
            for block in f.read_text(encoding="utf-8").split("\n\n"):
                if block.strip():
                    yield block.strip()
        else:
            raise DataSourceError(f"{f} is neither .txt nor .jsonl; convert it or pass a folder")


HELDOUT_FRAC = 0.01  # share of documents held out where a source has no held-out split
HUB_HELDOUT_SPLITS = ("validation", "test")  # a hub dataset's held-out split, first found


def is_heldout(text: str, frac: float = HELDOUT_FRAC) -> bool:
    """Whether a document belongs to the held-out share ``frac`` of its source: its BLAKE2b
    hash, read as a number in [0, 1), is below ``frac``. Stable across runs, machines and the
    order of files; identical documents fall on the same side."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2**64 < frac


def _side(docs: Iterable[str], heldout: bool, frac: float) -> Iterator[str]:
    return (d for d in docs if is_heldout(d, frac) == heldout)


@lru_cache(maxsize=None)
def _hub_heldout_split(name: str) -> str | None:
    """The hub dataset's held-out split (validation, else test), or None if it has neither."""
    import datasets  # imported here: it is slow to import and only hub runs need it

    try:
        names = datasets.get_dataset_split_names(name)
    except Exception as e:  # datasets raises many kinds; all mean "could not open it"
        raise DataSourceError(
            f"could not read the splits of dataset {name!r} ({type(e).__name__}); check the name and "
            "the network, or use the offline default corpus (omit --dataset)"
        ) from None
    return next((s for s in HUB_HELDOUT_SPLITS if s in names), None)


def _hf_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds; all mean "could not open it"
        raise DataSourceError(
            f"could not stream split {split!r} of dataset {name!r} ({type(e).__name__}); check the name "
            "and the network, or use the offline default corpus (omit --dataset)"
        ) from None
    for row in ds:
        yield row[text_field]


def _hub(name: str, heldout: bool, text_field: str, frac: float) -> Iterator[str]:
    """A hub dataset's training or held-out documents (see the module docstring)."""
    held = _hub_heldout_split(name)
    if held is not None:
        return _hf_documents(name, held if heldout else "train", text_field)
    return _side(_hf_documents(name, "train", text_field), heldout, frac)


def _wants_heldout(split: str) -> bool:
    if split in ("heldout", "test", "validation"):
        return True
    if split == "train":
        return False
    raise DataSourceError(f"split must be 'train' or 'heldout', not {split!r}")


def documents(source: str | None = None, seed: int = 0, split: str = "train", text_field: str = "text",
              heldout_frac: float = HELDOUT_FRAC) -> Iterator[str]:
    """Documents of ``source`` (see the module docstring) on one side of its held-out split:
    ``split="train"`` never yields a held-out document, ``"heldout"`` yields only those.
    ``seed`` varies the generated sources (saekit's corpus, ioi); files and hub datasets
    are read in their order."""
    heldout = _wants_heldout(split)
    if source in (None, "saekit"):
        return corpus.stream_text(seed, "heldout" if heldout else "train")
    if source == "ioi":
        return corpus.ioi_documents(seed + 7919 if heldout else seed)
    path = Path(source)
    if path.exists():
        return _side(_local_documents(path), heldout, heldout_frac)
    if source.endswith((".txt", ".jsonl")) or source.startswith((".", "/")):
        raise DataSourceError(f"no such file or folder: {source}")
    return _hub(source, heldout, text_field, heldout_frac)


def describe_heldout(source: str | None, heldout_frac: float = HELDOUT_FRAC) -> str:
    """One line saying what ``documents(source, split="heldout")`` reads, for summaries."""
    if source in (None, "saekit"):
        return "saekit corpus: its held-out stream (held-out templates and name pairs)"
    if source == "ioi":
        return "ioi: IOI prompts drawn with a held-out seed"
    if Path(source).exists():
        return f"local files: the {heldout_frac:.2%} of documents whose hash is held out (never trained on)"
    held = _hub_heldout_split(source)
    if held is not None:
        return f"hub dataset: its {held!r} split (training reads 'train')"
    return f"hub dataset: the {heldout_frac:.2%} of 'train' documents whose hash is held out (never trained on)"


def pack(docs: Iterable[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate tokenized documents, separated by BOS, into ``[seq_len]`` sequences
    that each begin with BOS (the position the model always sees first)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer.encode(doc, add_special_tokens=False))
        buf.append(bos)
        while len(buf) >= seq_len - 1:
            yield torch.tensor([bos] + buf[: seq_len - 1], dtype=torch.long)
            del buf[: seq_len - 1]


def batches(seqs: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack sequences into ``[batch_size, seq_len]`` batches; the last partial one is dropped."""
    it = iter(seqs)
    while chunk := list(itertools.islice(it, batch_size)):
        if len(chunk) < batch_size:
            return
        yield torch.stack(chunk)  # [batch, seq_len]


def token_batches(tokenizer, source: str | None = None, seq_len: int = 128, batch_size: int = 32,
                  seed: int = 0, split: str = "train", heldout_frac: float = HELDOUT_FRAC) -> Iterator[torch.Tensor]:
    """The usual pipeline: ``documents`` → ``pack`` → ``batches``."""
    return batches(pack(documents(source, seed, split, heldout_frac=heldout_frac), tokenizer, seq_len), batch_size)


def heldout_sequences(tokenizer, source: str | None, n_seq: int, seq_len: int, seed: int,
                      heldout_frac: float = HELDOUT_FRAC) -> torch.Tensor:
    """``[n, seq_len]`` packed sequences of ``source``'s held-out documents, ``n = n_seq`` or
    as many as the held-out documents fill (at least one, else ``DataSourceError``)."""
    seqs = pack(documents(source, seed, "heldout", heldout_frac=heldout_frac), tokenizer, seq_len)
    got = list(itertools.islice(seqs, n_seq))
    if not got:
        raise DataSourceError(f"the held-out documents of {source} fill no {seq_len}-token sequence; "
                              "add documents or raise the held-out fraction (--heldout-frac)")
    return torch.stack(got)
