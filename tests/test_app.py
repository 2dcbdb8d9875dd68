"""The explorer through Streamlit's AppTest: every page, and every bad input ending in a
message on the page rather than an exception."""

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from saekit.app.launch import command, script_path
from saekit.errors import ConfigError
from saekit.types import ELEMENTWISE
from tests.app_helpers import PROMPT, analyzed_sae, make_sae
from tests.arch_helpers import NEW


@pytest.fixture(scope="module")
def sae_dir(model, tmp_path_factory, request):
    """An analyzed SAE of the architecture ``request.param`` (default topk)."""
    sparsity = getattr(request, "param", "topk")
    return analyzed_sae(model, tmp_path_factory.mktemp(f"app-{sparsity}") / "sae", sparsity=sparsity)


def run_app(monkeypatch, sae_path: str | None, page: str | None = None) -> AppTest:
    if sae_path is None:
        monkeypatch.delenv("SAEKIT_APP_SAE", raising=False)
    else:
        monkeypatch.setenv("SAEKIT_APP_SAE", sae_path)
    at = AppTest.from_file(str(script_path()), default_timeout=180)
    at.run()
    if page is not None:
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception
    return at


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


# ---- the pages ----------------------------------------------------------------------------
@pytest.mark.parametrize("sae_dir", ["topk", *NEW], indirect=True)
def test_features_page_lists_latents_and_shows_a_card(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir)
    assert not at.error and not at.warning
    sparsity = json.loads((Path(sae_dir) / "cfg.json").read_text())["sparsity"]
    caption = texts(at.sidebar.caption)
    assert f"{sparsity} SAE, 256 latents" in caption and ("k=16" in caption) == (sparsity not in ELEMENTWISE)
    assert at.dataframe[0].value.shape[0] == 256  # one row per latent
    table = at.dataframe[0].value
    latent = int(table.sort_values("frequency").iloc[-1]["latent"])  # surely has contexts
    at.number_input(key="latent").set_value(latent).run()
    assert at.subheader[0].value == f"Latent {latent}"
    assert [m.label for m in at.metric] == ["firing frequency", "mean activation", "max activation"]
    assert {e.key for e in at.get("plotly_chart")} == {"card_hist", "card_heads", "card_dfa"}
    assert "rgba(255, 140, 0" in at.get("html")[0].proto.body  # contexts shaded by activation
    at.selectbox(key=f"dfa_context_{latent}").set_value(1).run()  # DFA for another context
    assert not at.exception


def test_features_sort_and_search(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir)
    at.selectbox(key="feat_sort").set_value("frequency, low first").run()
    freq = at.dataframe[0].value["frequency"].tolist()
    assert freq == sorted(freq)
    token = next(t for t in at.dataframe[0].value["top token"] if t.strip())
    at.text_input(key="feat_search").input(token.strip()).run()
    shown = at.dataframe[0].value
    assert 0 < len(shown) < 256
    assert all(token.strip().lower() in (a + b).lower() for a, b in zip(shown["top token"], shown["boosts"]))


@pytest.mark.parametrize("sae_dir", ["topk", *NEW], indirect=True)
def test_prompt_lens_and_click_through_to_the_card(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir, "Prompt lens")
    table = at.dataframe[0].value
    assert table["token"].tolist()[-1] == " to"  # every prompt token, BOS left out
    latent = at.selectbox(key="lens_latent").value
    at.button(key="lens_open").click().run()
    assert at.sidebar.radio(key="page").value == "Features"
    assert at.subheader[0].value == f"Latent {latent}"


@pytest.mark.parametrize("sae_dir", ["topk", *NEW], indirect=True)
def test_steering_shows_both_continuations_and_the_ioi_logit_difference(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir, "Steering")
    at.number_input(key="steer_n").set_value(2).run()
    at.number_input(key="steer_latent_0").set_value(5)
    at.number_input(key="steer_value_0").set_value(300.0)
    at.selectbox(key="steer_method_1").set_value("ablate")
    at.number_input(key="steer_latent_1").set_value(7)
    at.slider(key="steer_tokens").set_value(6)
    at.button(key="steer_go").click().run()
    assert not at.exception and not at.error
    unsteered, steered = (c.value for c in at.code)
    assert unsteered.startswith(PROMPT) and steered.startswith(PROMPT) and steered != unsteered
    assert "logit(Mary) − logit(John)" in at.metric[0].label


@pytest.mark.parametrize("sparsity, k", [("topk", 4), ("gated", None)])
def test_evaluations_page_shows_reports_or_the_command(monkeypatch, sae_dir, tmp_path, sparsity, k):
    at = run_app(monkeypatch, sae_dir, "Evaluations")
    info = texts(at.info)
    assert f"saekit eval --sae {sae_dir}" in info and f"saekit eval-ioi --sae {sae_dir}" in info
    folder = tmp_path / "with_reports"
    shutil.copytree(sae_dir, folder)
    result = {"hook": "blocks.5.attn.hook_z", "sparsity": sparsity, "d_sae": 64, "k": k, "l0": 16.0, "l0_std": 1.0,
              "explained_variance": 0.9, "fvu": 0.1, "ce_loss_recovered_zero_all": 0.9,
              "ce_loss_recovered_zero_keep_bos": 0.9, "ce_loss_recovered_mean": 0.8,
              "kl": 0.01, "never_fired_frac": 0.0, "dense_frac": 0.0, "tokens": 100, "l0_hist": [0, 2, 5],
              "log10_freq_hist": {"edges": [-2.0, -1.0, 0.0], "counts": [3, 4]}, "ce_loss_clean": 1.0,
              "ce_loss_sae": 1.1, "ce_loss_mean_ablation": 1.5, "ce_loss_zero_ablation_keep_bos": 2.0,
              "ce_loss_zero_ablation_all": 2.1}
    (folder / "eval.json").write_text(json.dumps(result))
    (folder / "ioi_eval.json").write_text("{not json")
    at = run_app(monkeypatch, str(folder), "Evaluations")
    assert not at.exception and [i.value for i in at.info] == []
    assert len(at.get("plotly_chart")) == 3  # frequency and L0 histograms, the CE losses
    head = at.get("html")[0].proto.body
    assert f"{sparsity}, d_sae=64" in head and ("k=4" in head) == (k is not None) and "k=None" not in head
    assert "ioi_eval.json is not a readable" in texts(at.error) and "saekit eval-ioi --sae" in texts(at.error)


def test_the_picker_opens_on_a_shipped_sae_and_the_evaluations_page_compares_them(monkeypatch, sae_dir, tmp_path):
    from saekit import formats

    other = tmp_path / "another"
    shutil.copytree(sae_dir, other)
    (other / "eval.json").write_text(json.dumps({"l0": 7.5, "explained_variance": 0.5, "ce_loss_recovered_mean": 0.25,
                                                 "kl": 0.125, "never_fired_frac": 0.0, "dense_frac": 0.0}))
    monkeypatch.setattr(formats, "shipped_saes", lambda: [Path(sae_dir), other])
    at = run_app(monkeypatch, None)
    picker = at.sidebar.selectbox(key="sae_choice")
    assert picker.options == [Path(sae_dir).name, "another", "another folder or hf:// path"]
    assert picker.value == Path(sae_dir).name and "sae_path" not in [t.key for t in at.sidebar.text_input]
    assert at.subheader[0].value == "Latent 0"
    at.sidebar.selectbox(key="sae_choice").set_value("another").run()
    at.sidebar.radio(key="page").set_value("Evaluations").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["sae"]) == [Path(sae_dir).name, "another"]
    assert table.set_index("sae").loc["another", "L0"] == 7.5  # read from that folder's eval.json
    at.sidebar.selectbox(key="sae_choice").set_value("another folder or hf:// path").run()
    assert at.sidebar.text_input(key="sae_path").value == ""


# ---- bad input ----------------------------------------------------------------------------
def test_no_sae_at_all_says_to_pass_one(monkeypatch):
    from saekit import formats

    monkeypatch.setattr(formats, "shipped_saes", lambda: [])
    at = run_app(monkeypatch, None)
    assert "saekit app --sae PATH" in texts(at.info)


def test_wrong_sae_path(monkeypatch, tmp_path):
    at = run_app(monkeypatch, str(tmp_path / "nowhere"))
    assert "no SAE folder" in texts(at.error)
    (tmp_path / "empty").mkdir()
    at.sidebar.text_input(key="sae_path").input(str(tmp_path / "empty")).run()
    assert not at.exception and "cfg.json" in texts(at.error)


def test_sae_for_another_model(monkeypatch, tmp_path):
    make_sae(d_in=64, hook_shape=(4, 16)).save(tmp_path / "narrow")
    at = run_app(monkeypatch, str(tmp_path / "narrow"))
    assert "expects d_in=64" in texts(at.error)
    make_sae(model_name="./no-such-model").save(tmp_path / "elsewhere")
    at = run_app(monkeypatch, str(tmp_path / "elsewhere"))
    err = texts(at.error)
    assert "no-such-model" in err and "cfg.json model_name" in err


def test_latent_out_of_range(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir)
    at.number_input(key="latent").set_value(256).run()
    assert "out of range" in texts(at.error) and "256 latents" in texts(at.error)
    at = run_app(monkeypatch, sae_dir, "Steering")
    at.number_input(key="steer_latent_0").set_value(999)
    at.button(key="steer_go").click().run()
    assert "out of range" in texts(at.error)


def test_empty_prompt(monkeypatch, sae_dir):
    at = run_app(monkeypatch, sae_dir, "Prompt lens")
    at.text_area(key="lens_prompt").input("   ").run()
    assert "prompt is empty" in texts(at.warning)
    at = run_app(monkeypatch, sae_dir, "Steering")
    at.text_area(key="steer_prompt").input("").run()
    at.button(key="steer_go").click().run()
    assert "prompt is empty" in texts(at.warning) and not at.code


def test_missing_or_stale_statistics(monkeypatch, sae_dir, tmp_path):
    folder = tmp_path / "nostats"
    shutil.copytree(sae_dir, folder, ignore=shutil.ignore_patterns("stats"))
    at = run_app(monkeypatch, str(folder))
    assert f"saekit analyze --sae {folder}" in texts(at.warning)
    assert at.subheader[0].value == "Latent 0"  # the parts of the card that need no statistics
    assert {"card_heads"} <= {e.key for e in at.get("plotly_chart")}
    stale = tmp_path / "stale"
    shutil.copytree(sae_dir, stale)
    make_sae(seed=1).save(stale)  # new weights, old statistics
    at = run_app(monkeypatch, str(stale))
    assert "other SAE weights" in texts(at.warning)


def test_launch_command():
    assert script_path().name == "main.py" and script_path().is_file()
    cmd = command(8765, "127.0.0.1")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and "8765" in cmd and "127.0.0.1" in cmd
    with pytest.raises(ConfigError, match="port"):
        command(70000, "127.0.0.1")


def test_an_hf_sae_opens_from_the_hub_cache_with_its_statistics_under_runs(monkeypatch, sae_dir, tmp_path):
    """``saekit app --sae hf://...``: the SAE comes from huggingface_hub's cache (offline, laid out
    as the library lays it out) and its statistics and reports from runs/hf/..., as every command
    writes them."""
    from huggingface_hub import constants

    from tests.test_hub import cache_folder

    cache = tmp_path / "cache"
    cache_folder(cache, "saekit-tests/app", Path(sae_dir), "L5", "d" * 40)  # stats/ stays out
    shutil.copytree(Path(sae_dir) / "stats", tmp_path / "runs/hf/saekit-tests/app/L5/stats")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    at = run_app(monkeypatch, "hf://saekit-tests/app/L5")
    assert not at.error and not at.warning  # the statistics were found under runs/hf
    assert at.dataframe[0].value.shape[0] == 256 and at.subheader[0].value == "Latent 0"
    at.sidebar.radio(key="page").set_value("Evaluations").run()
    assert "saekit eval --sae hf://saekit-tests/app/L5" in texts(at.info)
    at = run_app(monkeypatch, "hf://saekit-tests/absent/L5")
    assert "is not in the Hugging Face cache" in texts(at.error)
