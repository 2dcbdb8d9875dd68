"""Build saekit's embedded model: train the tokenizer and a small GPT-2 on saekit's corpus.

    python -m saekit.training.build_model --out pretrained/saekit-ioi-6l

Deterministic from ``--seed`` on CPU. The recipe follows the measurements in
shared/reference/organism-notes.md: IOI is not learned from packed documents alone within
a CPU budget, but short single-prompt IOI sequences with a loss on the answer make the rule
form in a few hundred steps. So every step mixes two batches:
  * language modelling on packed 128-token corpus sequences (next-token loss on all tokens);
  * single IOI prompts from the training templates and pairs (BOS + prompt + answer), with
    the loss on the answer token.
Held-out templates and held-out name pairs are never trained on; they are scored during
training and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from saekit import corpus
from saekit.data import pack
from saekit.ioi import encode_prompts, logit_diff

BOS = "<|endoftext|>"


def train_tokenizer(seed: int, vocab_size: int, n_docs: int):
    """Byte-level BPE on the training stream; every IOI word must come out as one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    stream = corpus.stream_text(seed, "train")
    words = " ".join(corpus.vocabulary_words())
    # The vocabulary list, repeated, guarantees each name/place/object is frequent enough
    # to be merged into a single " word" token.
    texts = [next(stream) for _ in range(n_docs)] + [words] * 200
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS)
    split_words = [w for w in corpus.vocabulary_words() if len(fast.encode(" " + w)) != 1]
    if split_words:
        raise SystemExit(f"tokenizer splits {split_words[:10]}...; raise --vocab-size")
    return fast


def ioi_batch(rng: random.Random, tok, n: int, split: str):
    """``n`` prompts as right-padded ids [n, T], the answer position and IO/S token ids."""
    return encode_prompts(tok, [corpus.make_ioi(rng, split) for _ in range(n)])


@torch.no_grad()
def score_ioi_hf(model, tok, n: int, split: str, seed: int = 1234) -> dict:
    """Accuracy (logit IO > logit S) and mean logit difference of the Hugging Face model being
    built (``model(x).logits``) on ``n`` fresh prompts; ``saekit.ioi.score_ioi`` scores a
    TransformerBridge."""
    model.eval()
    x, last, io, s = ioi_batch(random.Random(f"score-{split}-{seed}"), tok, n, split)
    logits = model(x).logits[torch.arange(n), last]  # [n, vocab]
    ld = logit_diff(logits, io, s)
    model.train()
    return {"acc": (ld > 0).float().mean().item(), "logit_diff": ld.mean().item()}


@torch.no_grad()
def heldout_lm_loss(model, tok, n_seq: int = 64, seq_len: int = 128) -> float:
    model.eval()
    seqs = pack(corpus.stream_text(0, "heldout"), tok, seq_len)
    x = torch.stack([next(seqs) for _ in range(n_seq)])
    loss = model(x, labels=x).loss.item()
    model.train()
    return loss


def write_model_card(folder: Path) -> None:
    """README.md of the model folder, from its training_log.json."""
    folder = Path(folder)
    rec = json.loads((folder / "training_log.json").read_text())
    f, a = rec["final"], rec["final"]["args"]
    cfg = json.loads((folder / "config.json").read_text())
    rows = "\n".join(
        f"| {r['step']} | {r['lm_loss']:.3f} | {r['ioi_train']['acc']:.3f} | {r['ioi_heldout']['acc']:.3f} "
        f"| {r['ioi_heldout']['logit_diff']:.2f} |" for r in rec["log"])
    text = f"""# saekit-ioi-6l

saekit's embedded model: a GPT-2-architecture language model (`transformers.GPT2LMHeadModel`)
trained by saekit on its own synthetic corpus so that it solves indirect object
identification (IOI). It lets every saekit command run offline.

## Architecture
{cfg['n_layer']} layers, d_model {cfg['n_embd']}, {cfg['n_head']} heads (d_head {cfg['n_embd'] // cfg['n_head']}),
context {cfg['n_positions']}, vocabulary {cfg['vocab_size']} (byte-level BPE trained on the corpus;
every IOI name, place and object is one token with its leading space), no dropout,
{f['n_params']:,} parameters.

## Training
- Corpus: `saekit.corpus` (seed {a['seed']}): short stories about 200+ people, places and
  objects; IOI sentences from {len(corpus.TRAIN_TEMPLATES)} training templates in ABB and BAB order;
  repeated word lists for induction. {len(corpus.HELDOUT_TEMPLATES)} templates and one name pair
  in eight are held out of training.
- Each step mixes {a['lm_batch']} packed {a['seq_len']}-token corpus sequences (next-token loss) and
  {a['ioi_batch']} single IOI prompts with name-free filler sentences at random places (loss on the
  answer token); AdamW lr {a['lr']}, 100 warm-up steps, cosine decay to 10%.
- {a['steps']} steps, {f['train_minutes']:.1f} minutes on CPU ({a.get('threads', 1)} thread, torch {f['torch']}).
- Rebuild: `python -m saekit.training.build_model --out pretrained/saekit-ioi-6l` (deterministic).

## Figures
| measure | value |
|---|---|
| IOI accuracy, 1,000 prompts, held-out templates and held-out name pairs | {f['ioi_heldout_1000']['acc']:.3f} |
| mean logit difference (IO − S), same prompts | {f['ioi_heldout_1000']['logit_diff']:.2f} |
| IOI accuracy, 1,000 prompts, training templates | {f['ioi_train_templates_1000']['acc']:.3f} |
| next-token loss on held-out corpus text (nats) | {f['heldout_lm_loss']:.3f} |

During training (500 prompts each):

| step | LM loss | IOI acc (train templates) | IOI acc (held out) | logit diff (held out) |
|---|---|---|---|---|
{rows}
"""
    (folder / "README.md").write_text(text)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's options: the output folder, the seed, and the model's, the batches'
    and the schedule's sizes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="pretrained/saekit-ioi-6l")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--ioi-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; fixed so that the float results repeat across machines")
    return ap.parse_args(argv)


def new_model(args: argparse.Namespace, tok):
    """A freshly initialized GPT-2 (from torch's global generator) of ``args``' sizes over
    ``tok``'s vocabulary, without dropout, BOS doubling as EOS."""
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id,
    )
    return GPT2LMHeadModel(cfg)


def optimizer_and_schedule(model, args: argparse.Namespace):
    """AdamW at ``args.lr`` and its schedule: 100 linear warm-up steps, then a cosine decay
    to 10% of the rate at ``args.steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))))
    return opt, sched


def train_model(model, tok, args: argparse.Namespace, t0: float) -> list[dict]:
    """Train ``model`` for ``args.steps`` steps, each on a batch of packed corpus sequences
    (next-token loss) plus a batch of IOI prompts (loss on the answer); return the log rows
    (losses, IOI scores, minutes since ``t0``) written every ``args.eval_every`` steps and at
    the last."""
    opt, sched = optimizer_and_schedule(model, args)
    lm_stream = pack(corpus.stream_text(args.seed, "train"), tok, args.seq_len)
    rng = random.Random(f"ioi-train-{args.seed}")
    log = []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        x_lm = torch.stack([next(lm_stream) for _ in range(args.lm_batch)])  # [lm_batch, seq]
        lm_loss = model(x_lm, labels=x_lm).loss
        x, last, io, _ = ioi_batch(rng, tok, args.ioi_batch, "train")
        logits = model(x).logits[torch.arange(len(x)), last]  # [ioi_batch, vocab]
        ioi_loss = F.cross_entropy(logits, io)
        loss = lm_loss + ioi_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(lm=f"{lm_loss.item():.3f}", ioi=f"{ioi_loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "lm_loss": lm_loss.item(), "ioi_loss": ioi_loss.item(),
                   "ioi_heldout": score_ioi_hf(model, tok, 500, "heldout"),
                   "ioi_train": score_ioi_hf(model, tok, 500, "train"),
                   "minutes": (time.time() - t0) / 60}
            log.append(row)
            tqdm.write(json.dumps(row))
    return log


def final_scores(model, tok, args: argparse.Namespace, t0: float) -> dict:
    """The trained model's figures: IOI on 1,000 held-out and 1,000 training-template prompts,
    the held-out next-token loss, minutes since ``t0``, parameter count, options, torch."""
    return {
        "ioi_heldout_1000": score_ioi_hf(model, tok, 1000, "heldout", seed=0),
        "ioi_train_templates_1000": score_ioi_hf(model, tok, 1000, "train", seed=0),
        "heldout_lm_loss": heldout_lm_loss(model, tok),
        "train_minutes": (time.time() - t0) / 60,
        "n_params": sum(p.numel() for p in model.parameters()),
        "args": vars(args),
        "torch": torch.__version__,
    }


def save_model(out: Path, model, tok, final: dict, log: list[dict]) -> None:
    """Write the model, tokenizer, training_log.json and README.md to a temporary folder
    beside ``out``, then put it in ``out``'s place (replacing any folder there)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent if out.parent.exists() else None))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(json.dumps({"final": final, "log": log}, indent=1))
    write_model_card(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv=None):
    """Build the embedded model as the module docstring describes and save it to ``--out``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    tok = train_tokenizer(args.seed, args.vocab_size, n_docs=20_000)
    model = new_model(args, tok)
    log = train_model(model, tok, args, t0)
    final = final_scores(model, tok, args, t0)
    print(json.dumps(final, indent=1))
    out = Path(args.out)
    save_model(out, model, tok, final, log)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
