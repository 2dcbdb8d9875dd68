import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from saekit import load_sae
from saekit.cli import main
from saekit.errors import ConfigError, HookError, MismatchError, SAEFileError
from saekit.training import TrainConfig, train_sae
from saekit.training.config import DataOptions, OptimOptions, RunOptions
from saekit.types import SAEConfig
from saekit.training.trainer import TrainingDiverged


def synthetic(n=8192, d=32, n_feat=128, k=4, seed=0):
    """Sparse sums of unit features: an SAE can explain most of the variance."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.randint(0, n_feat, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) * 2 + 0.5
    return (coef[..., None] * feats[idx]).sum(1)


def small_cfg(**data):
    return TrainConfig(sae=SAEConfig(d_sae=256, k=4), optim=OptimOptions(lr=3e-3, warmup_steps=10),
                       data=DataOptions(batch_size=256, fill_tokens=2048, total_tokens=256 * 200, **data),
                       run=RunOptions(progress=False, log_every=50))


def test_train_sae_on_tensor_beats_the_trivial_baseline():
    x = synthetic()
    sae = train_sae(x, small_cfg())
    out = sae(x)
    fvu = ((x - out.x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.25  # predicting the mean gives 1.0
    assert ((out.codes.values > 0).sum(1) <= 4).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=1e-5)


def test_train_sae_on_an_iterable_of_batches():
    x = synthetic(n=4096)
    cfg = small_cfg()
    cfg.data = replace(cfg.data, total_tokens=256 * 16)
    sae = train_sae((x[i:i + 256] for i in range(0, 4096, 256)), cfg)
    assert sae.cfg.d_in == 32


def test_non_finite_loss_stops_with_error_and_keeps_checkpoint(tmp_path):
    x = synthetic(n=4096)
    x[2048:] = float("nan")  # the second half of the data is broken
    cfg = small_cfg()
    cfg.data = replace(cfg.data, fill_tokens=4096, total_tokens=256 * 40)
    cfg.run = replace(cfg.run, checkpoint_every=4)

    def batches():
        for i in range(0, 4096, 256):
            yield x[i:i + 256]
    with pytest.raises(TrainingDiverged, match="at step 8"):
        train_sae(batches(), cfg, out=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["step_0000004.pt", "step_0000008.pt"]


# A subprocess uses this process's thread count, so float results match bitwise.
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


TINY = ["--d-sae", "256", "-k", "8", "--batch-size", "512", "--fill-tokens", "4064",
        "--seq-len", "128", "--total-tokens", "20480", "--warmup-steps", "5", "--eval-tokens", "2032",
        "--progress", "false", "--log-every", "5"]


def test_default_train_end_to_end_small_budget(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--hook", "blocks.5.attn.hook_z", "--out", str(out), *TINY]) == 0
    stdout = capsys.readouterr().out
    assert "explained variance" in stdout and "recovered" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["explained_variance"] <= 1 and summary["l0"] <= 8
    assert summary["ce_loss_zero_ablation_keep_bos"] > summary["ce_loss_clean"]
    assert summary["ce_loss_zero_ablation_all"] != summary["ce_loss_zero_ablation_keep_bos"]
    assert "ce_loss_recovered" not in summary and "ce_loss_recovered_mean" in summary
    assert summary["eval_split"].startswith("saekit corpus")
    assert summary["kl"] > 0 and 0 <= summary["dense_frac"] <= 1 and summary["l0_std"] >= 0
    sae = load_sae(out)
    assert sae.cfg.hook_name == "blocks.5.attn.hook_z" and len(sae.cfg.hook_shape) == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"fvu", "l0", "dead_frac", "aux", "lr"} <= set(rows[0])
    assert (out / "train_config.json").exists()


def test_cache_then_train_from_cache_matches_training_from_the_model(tmp_path):
    args = [a for a in TINY if a not in ("--eval-tokens", "2032")]
    # 14 steps of 512 = two fills of 4064 (7 batches each): exactly what the cache holds
    args = args[:args.index("--total-tokens")] + ["--total-tokens", "7168"] + args[args.index("--total-tokens") + 2:]
    assert main(["cache", "--out", str(tmp_path / "cache"), "--fill-tokens", "4064", "--batch-size", "512",
                 "--total-tokens", "8128"]) == 0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["n_shards"] == 2 and meta["dtype"] == "float32"
    assert main(["train", "--out", str(tmp_path / "a"), "--eval-tokens", "0", *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--eval-tokens", "0", "--from-cache", str(tmp_path / "cache"),
                 *args]) == 0
    a, b = load_sae(tmp_path / "a"), load_sae(tmp_path / "b")
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)


@pytest.mark.parametrize("sparsity", ["topk", "jumprelu", "gated", "matryoshka"])
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, sparsity):
    common = [*TINY, "--sparsity", sparsity, "--eval-tokens", "0", "--checkpoint-every", "4", "--total-tokens", "30720"]
    assert main(["train", "--out", str(tmp_path / "ref"), *common]) == 0
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "saekit", "train", "--out", str(out), *common],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step_0000012.pt")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "sae.safetensors").exists(), "the run finished before it could be killed"
    assert main(["train", "--out", str(out), "--resume", *common]) == 0
    a, b = load_sae(tmp_path / "ref"), load_sae(out)
    assert b.cfg.sparsity == sparsity
    a, b = a.state_dict(), b.state_dict()  # every tensor: gated's b_gate, r_mag, b_mag, JumpReLU's threshold, ...
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated rows after the resume


@pytest.mark.parametrize("argv, message", [
    (["train", "--hook", "blocks.5.attn.hook_zz"], "closest: blocks.5.attn.hook_z"),
    (["train", "--k", "500", "--d-sae", "256"], "k=500 must be between 1 and d_sae=256"),
    (["train", "--from-cache", "/no/such/cache"], "no activation cache at /no/such/cache"),
    (["train", "--total-tokens", "10", "--batch-size", "512"], "less than one batch"),
    (["train", "--dataset", "./missing.jsonl"], "no such file or folder: ./missing.jsonl"),
])
def test_train_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o"), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--out", out, *TINY, "--total-tokens", "4096", "--checkpoint-every", "2", "--eval-tokens", "0"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "true", "--k", "4"]) == 2
    assert "--resume with a different config (sae.k changed)" in capsys.readouterr().err


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from saekit.training import checkpoint as ckpt

    cfg = small_cfg()
    state = {"step": 1, "w": torch.ones(3)}
    ckpt.save(tmp_path, state, cfg)
    ckpt.save(tmp_path, {**state, "step": 2}, cfg)
    newest = tmp_path / "checkpoints" / "step_0000002.pt"
    newest.write_bytes(newest.read_bytes()[:-10])  # torn write
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert ckpt.latest(tmp_path)["state"]["step"] == 1
    (tmp_path / "checkpoints" / "step_0000001.pt").write_bytes(b"x")
    with pytest.warns(UserWarning), pytest.raises(SAEFileError, match="every checkpoint"):
        ckpt.latest(tmp_path)


def test_sae_for_another_model_or_hook_is_a_mismatch(model):
    from saekit import SAE, SAEConfig
    from saekit.splice import check_sae_fits

    d = model.cfg.n_heads * model.cfg.d_head
    with pytest.raises(MismatchError, match="does not have"):
        check_sae_fits(model, SAE(SAEConfig(d_in=d, d_sae=64, k=4, hook_name="blocks.99.attn.hook_z")))
    with pytest.raises(MismatchError, match="expects d_in=7"):
        check_sae_fits(model, SAE(SAEConfig(d_in=7, d_sae=64, k=4, hook_name="blocks.5.attn.hook_z")))


def test_check_sae_fits_returns_the_hook_shape_without_changing_the_sae(model):
    """An SAE whose config lacks hook_shape (a SAELens hook_z file) gets a config with the
    model's (n_heads, d_head) back; the SAE itself is left as it was."""
    from saekit import SAE, SAEConfig
    from saekit.splice import check_sae_fits

    shape = (model.cfg.n_heads, model.cfg.d_head)
    sae = SAE(SAEConfig(d_in=shape[0] * shape[1], d_sae=64, k=4, hook_name="blocks.5.attn.hook_z"))
    before = sae.cfg
    fitted = check_sae_fits(model, sae)
    assert fitted.hook_shape == shape and sae.cfg is before and sae.cfg.hook_shape == ()
    assert fitted == replace(before, hook_shape=shape)
    full = SAE(fitted)
    assert check_sae_fits(model, full) is full.cfg  # nothing to fill in: the same config back


def test_unknown_hook_error_names_close_matches(model):
    from saekit.activations import resolve_hook

    with pytest.raises(HookError, match="blocks.5.attn.hook_z"):
        resolve_hook(model, "blocks.5.attn.hookz")


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


def test_trainer_state_round_trip_resumes_the_same():
    """A trainer loaded from another's state dict (Adam's moments for W_enc_T included)
    takes the same next step as the trainer it was saved from."""
    from saekit.sae import SAE, SAEConfig
    from saekit.training.trainer import Trainer

    x, cfg = synthetic(n=512), small_cfg()

    def trainer():
        return Trainer(SAE(SAEConfig(d_in=32, d_sae=256, k=4), seed=0), cfg, total_steps=10)

    a = trainer()
    a.train_step(x[:256])
    b = trainer()
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as written to disk: no tensors shared with `a`
    for t in (a, b):
        t.train_step(x[256:])
    assert torch.equal(b.sae.W_enc, a.sae.W_enc)


def test_auxk_default_is_gao_et_al_residual_normalisation():
    """By default L_aux = α‖e − ê‖² / Σ‖e − mean e‖² with no dead-count scale (Gao et al.'s
    code); aux_norm="input" keeps saekit's earlier α·min(n_dead/k_aux, 1)‖e − ê‖²/Σ‖x − x̄‖²."""
    from saekit import SAE, SAEConfig
    from saekit.training.losses import auxk_loss, encode_with_aux, total_variance

    sae = SAE(SAEConfig(d_in=24, d_sae=96, k=4), seed=0)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:6] = True  # fewer dead latents than k_aux = 12: the old scale would be 0.5
    enc = encode_with_aux(sae, x, None, dead.float(), 6)
    x_hat = sae.decode(enc.codes).detach()
    e = x - x_hat
    e_hat = enc.aux.dense(96) @ sae.W_dec
    num = (e - e_hat).pow(2).sum()
    got = auxk_loss(sae, x, x_hat, enc.aux, 6, 12, 1 / 32, total_variance(x))["aux"]
    torch.testing.assert_close(got, num / (e - e.mean(0)).pow(2).sum() / 32, rtol=1e-4, atol=0)
    old = auxk_loss(sae, x, x_hat, enc.aux, 6, 12, 1 / 32, total_variance(x), norm="input")["aux"]
    torch.testing.assert_close(old, 0.5 * num / (x - x.mean(0)).pow(2).sum() / 32, rtol=1e-4, atol=0)
    assert TrainConfig().optim.aux_norm == "residual"


def test_latents_below_the_firing_threshold_count_as_dead():
    """A latent whose activations stay under 1e-3 is not firing (OpenAI's rule): its
    dead counter keeps growing."""
    from saekit import SAE, SAEConfig
    from saekit.training.trainer import Trainer

    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=16), seed=0)  # k = d_sae: every latent is selected
    with torch.no_grad():
        sae.W_enc_T.zero_()
        sae.b_enc.fill_(1e-4)  # every latent "on", but at 1e-4
        sae.b_enc[0] = 1.0
    cfg = TrainConfig(optim=OptimOptions(lr=1e-9, dead_tokens=100, aux="none"))
    t = Trainer(sae, cfg, total_steps=10)
    t.train_step(torch.randn(64, 8))
    assert t.tokens_since_fired[0] == 0 and (t.tokens_since_fired[1:] == 64).all()


def test_geometric_median_init_of_b_dec():
    """--b-dec-init geometric_median: Weiszfeld's point is robust to outliers where the mean
    is not, and it is what training starts from."""
    from saekit.training.trainer import geometric_median

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g) * 0.1 + torch.tensor([1.0, -2.0, 0.5, 0.0])
    x[:100] += 1000  # 5% far outliers drag the mean by ~50
    m = geometric_median(x)
    assert (m - torch.tensor([1.0, -2.0, 0.5, 0.0])).abs().max() < 0.05
    assert (x.mean(0) - m).abs().max() > 10
    data = synthetic(n=8192, d=16)
    data[:200] += 50
    base = dict(sae=SAEConfig(d_sae=64, k=4), data=DataOptions(batch_size=1024, fill_tokens=8192, total_tokens=1024),
                optim=OptimOptions(lr=1e-12, warmup_steps=0), run=RunOptions(progress=False))
    sae_gm = train_sae(data, _with_init(base, "geometric_median"))
    sae_mean = train_sae(data, _with_init(base, "mean"))
    assert (sae_gm.b_dec - geometric_median(data)).abs().max() < 0.05  # one fill = all 8192 rows
    assert (sae_mean.b_dec - sae_gm.b_dec).abs().max() > 0.1


def _with_init(base: dict, how: str) -> TrainConfig:
    return TrainConfig(**{**base, "optim": replace(base["optim"], b_dec_init=how)})


def test_train_configs_of_the_earlier_layout_load_and_resume():
    """Run folders written before SAEConfig was nested in TrainConfig (``sae`` held d_sae,
    expansion, k, sparsity, impl; ``variant`` sat beside it) still load, and their
    checkpoints' identity still matches the same options, and only those."""
    from saekit.training.checkpoint import check_same_config
    from saekit.types import VariantOptions

    cfg = TrainConfig(sae=SAEConfig(d_sae=64, k=4, sparsity="gtopk", variant=VariantOptions(beta=2.0)), expansion=8)
    new = cfg.to_dict()
    sae = {k: new["sae"][k] for k in ("d_sae", "k", "sparsity", "impl")}
    old = {**{k: v for k, v in new.items() if k != "expansion"}, "sae": {**sae, "expansion": 8},
           "variant": new["sae"]["variant"]}
    assert TrainConfig.from_dict(old) == cfg
    old_identity = copy.deepcopy(old)
    for k in ("out", "resume", "progress", "wandb", "log_every", "checkpoint_every", "distribute_hooks"):
        old_identity["run"].pop(k)
    old_identity["data"].pop("device")
    check_same_config(old_identity, cfg)
    old_identity["variant"]["beta"] = 3.0
    with pytest.raises(ConfigError, match="sae.variant.beta"):
        check_same_config(old_identity, cfg)
