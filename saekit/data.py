"""Token streams: saekit's corpus, a Hugging Face dataset, or local files, packed into
fixed-length sequences that each start with BOS.

A *source* is named by a string:
- ``None`` or ``"saekit"``: saekit's own generated corpus (``saekit.corpus``), offline;
- ``"ioi"``: completed IOI prompts only (``saekit.corpus.ioi_documents``), offline;
- a path to a ``.txt`` file (one document per blank-line-separated block), a ``.jsonl``
  file (one JSON object per line with a ``"text"`` field), or a folder of such files;
- anything else: a Hugging Face dataset name, streamed with ``datasets`` (needs network).
"""

from __future__ import annotations

import itertools
import json
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


def _hf_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    import datasets  # imported here: it is slow to import and only hub runs need it

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds; all mean "could not open it"
        raise DataSourceError(
            f"could not stream dataset {name!r} ({type(e).__name__}); check the name and the "
            "network, or use the offline default corpus (omit --dataset)"
        ) from None
    for row in ds:
        yield row[text_field]


def documents(source: str | None = None, seed: int = 0, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents from ``source`` (see the module docstring). For saekit's corpus ``split``
    is ``"train"`` or ``"heldout"``; for a hub dataset it is the dataset split."""
    if source in (None, "saekit"):
        return corpus.stream_text(seed, "heldout" if split in ("heldout", "test", "validation") else "train")
    if source == "ioi":
        return corpus.ioi_documents(seed if split == "train" else seed + 7919)
    path = Path(source)
    if path.exists():
        return _local_documents(path)
    if source.endswith((".txt", ".jsonl")) or source.startswith((".", "/")):
        raise DataSourceError(f"no such file or folder: {source}")
    return _hf_documents(source, split, text_field)


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
                  seed: int = 0, split: str = "train") -> Iterator[torch.Tensor]:
    """The usual pipeline: ``documents`` → ``pack`` → ``batches``."""
    return batches(pack(documents(source, seed, split), tokenizer, seq_len), batch_size)
