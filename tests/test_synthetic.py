import torch

from saekit.cli import main
from saekit.training.synthetic import SyntheticOptions, bench, ground_truth, mmcs, sample


def test_ground_truth_data_has_the_promised_statistics():
    o = SyntheticOptions(d=16, n_true=64, mean_active=4, noise=0.0)
    truth = ground_truth(o)
    torch.testing.assert_close(truth.features.norm(dim=1), torch.ones(64))
    assert abs(truth.probs.sum().item() - 4) < 1e-4 and truth.probs[0] > truth.probs[-1]
    x = sample(o, truth, 4096)
    assert x.shape == (4096, 16)
    assert torch.equal(x, sample(o, truth, 4096))  # seeded


def test_mmcs_is_one_for_the_true_dictionary_and_low_for_noise():
    truth = ground_truth(SyntheticOptions(d=16, n_true=64))
    assert mmcs(truth.features * 3, truth.features) == (1.0, 1.0)  # scale does not matter
    m, rec = mmcs(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), truth.features)
    assert m < 0.8 and rec < 0.1


def test_bench_recovers_features_and_feature_choice_has_no_dead_latents():
    o = SyntheticOptions(d=16, n_true=48, mean_active=3, noise=0.0)
    rows = {r["variant"]: r for r in bench(o, ("topk", "feature_choice"), d_sae=96, k=3,
                                              n_train=16384, steps=300, batch=512, lr=5e-3)}
    assert rows["topk"]["mmcs"] > 0.8 and rows["topk"]["fvu"] < 0.3
    assert rows["feature_choice"]["never_fired_frac"] == 0


def test_bench_command_prints_a_table_and_rejects_unknown_suites(capsys):
    assert main(["bench", "synthetic", "--variants", "topk", "-d", "8", "--n-true", "16", "--d-sae", "32",
                 "-k", "2", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "| topk |" in out and "MMCS" in out
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "synthetic", "--variants", "bogus"]) == 2
