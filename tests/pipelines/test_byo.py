"""regmix fit / predict / search / export on the paper's own CSVs and a real MLflow store."""

import csv
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from regmix.paper_data import read_proxy_csvs
from regmix.pipelines.cli import main
from regmix.regression.saved import Regressor
from regmix.tracking.runs import CORPUS_TAG, HASH_TAG, proxy_runs, stage_run

PAPER = Path(__file__).parents[3] / "shared" / "regmix-paper-data"
PILE_CC = "metric/the_pile_pile_cc_val_loss"
# The paper's published CSVs live beside the checkout (../shared), not in it
needs_paper_data = pytest.mark.skipif(not PAPER.is_dir(), reason=f"no paper data at {PAPER}")


@needs_paper_data
def test_fit_predict_search_on_the_paper_data(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["fit", "--mixtures", str(PAPER / "train_mixture_1m.csv"), "--losses",
                 str(PAPER / "train_pile_loss_1m.csv"), "--target", PILE_CC, "--model", "linear",
                 "--out", str(model)]) == 0
    assert "CV Spearman" in capsys.readouterr().out
    # The fit's plots: its CV predictions, and how each domain moves each of the 13 losses
    assert (model / "metric_the_pile_pile_cc_val_loss" / "predicted_vs_measured.png").is_file()
    assert (model / "domain_interaction.png").stat().st_size > 10_000
    predictions = tmp_path / "p.csv"
    assert main(["predict", "--model", str(model), "--mixtures",
                 str(PAPER / "test_mixture_1m.csv"), "--out", str(predictions)]) == 0
    predicted = {int(r["index"]): float(r[PILE_CC]) for r in csv.DictReader(predictions.open())}
    truth = {int(r["index"]): float(r[PILE_CC])
             for r in csv.DictReader((PAPER / "test_pile_loss_1m.csv").open())}
    ids = sorted(truth)
    assert spearmanr([predicted[i] for i in ids], [truth[i] for i in ids]).statistic > 0.85
    # The same mixtures with their columns in another order predict the same
    rows = list(csv.reader((PAPER / "test_mixture_1m.csv").open()))
    order = [0, *reversed(range(1, len(rows[0])))]
    shuffled = tmp_path / "reordered.csv"
    with shuffled.open("w", newline="") as handle:
        csv.writer(handle).writerows([[row[i] for i in order] for row in rows])
    assert main(["predict", "--model", str(model), "--mixtures", str(shuffled), "--out",
                 str(tmp_path / "p2.csv")]) == 0
    again = {int(r["index"]): float(r[PILE_CC]) for r in csv.DictReader((tmp_path / "p2.csv").open())}
    assert again == pytest.approx(predicted, rel=1e-12)  # rows renormalise in another order

    chosen = tmp_path / "mixture.yaml"
    search = ["search", "--model", str(model), "--out", str(chosen), "--trials", "300",
              "--max-weight", "train_the_pile_pile_cc=0.3"]
    # A linear model's optimum sits in a corner no proxy measured: the search stays where the
    # training mixtures are (no domain above its largest trained weight)...
    train = read_proxy_csvs(PAPER / "train_mixture_1m.csv")  # rows normalised to sum to 1
    arxiv = "train_the_pile_arxiv"
    trained_max = dict(zip(train.domains, train.weights.max(axis=0).tolist(), strict=True))
    assert main(search) == 0
    record = yaml.safe_load(chosen.read_text())
    inside = record["weights"]
    assert all(w <= trained_max[d] + 1e-9 for d, w in inside.items())
    # The bounds it honoured are recorded: the trained region, and the asked-for cap on top
    assert record["bounds"]["train_the_pile_arxiv"] == pytest.approx([0, trained_max[arxiv]])
    assert record["bounds"]["train_the_pile_pile_cc"][1] == pytest.approx(0.3)
    assert record["constraints"] == {"max_weight": {"train_the_pile_pile_cc": 0.3},
                                     "allow_extrapolation": False}
    # One linear model: its members cannot disagree, so the uncertainty is its CV error, and a
    # gain over the best proxy is weighed against it
    assert record["uncertainty"]["members_spread"] == 0
    assert 0.05 < record["uncertainty"]["cv_rmse"] < 0.5
    assert record["predicted_gain"]["verdict"] in ("better", "within the CV error", "worse")
    assert "the best training proxy's prediction" in capsys.readouterr().out
    # The paper's recipe beside it, and the search's plots beside the YAML
    recipe = record["paper_recipe"]
    assert sum(recipe["weights"].values()) == pytest.approx(1)
    # ...which may leave the trained region, as in the paper: the record says where
    for domain, weight in recipe["weights"].items():
        beyond = weight > trained_max[domain] + 1e-9
        assert (domain in recipe["beyond_trained_region"]) == beyond
    assert recipe["nearest_training_l1"] >= 0
    assert {p.name for p in tmp_path.glob("mixture-*.png")} == {"mixture-mixture.png",
                                                               "mixture-simulated_losses.png"}
    # ...and refuses constraints that force it out, naming the domain and the way out...
    assert main([*search, "--fixed", f"{arxiv}={min(1.0, trained_max[arxiv] + 0.2):.3f}"]) == 2
    assert f"domain '{arxiv}'" in capsys.readouterr().err
    # ...unless the user asks for an extrapolation.
    assert main([*search, "--allow-extrapolation"]) == 0
    record = yaml.safe_load(chosen.read_text())
    assert any(w > trained_max[d] + 1e-3 for d, w in record["weights"].items())
    assert abs(sum(record["weights"].values()) - 1) < 1e-9
    assert record["weights"]["train_the_pile_pile_cc"] <= 0.3 + 1e-9
    assert record["constraints"] == {"max_weight": {"train_the_pile_pile_cc": 0.3},
                                     "allow_extrapolation": True}
    assert {"predicted", "uncertainty", "method", "nearest_training_l1"} <= set(record)
    # Repeated constraint flags add up
    assert main([*search, "--fixed", f"{arxiv}=0.05", "--fixed", "train_the_pile_github=0.05"]) == 0
    record = yaml.safe_load(chosen.read_text())
    assert record["constraints"]["fixed"] == {arxiv: 0.05, "train_the_pile_github": 0.05}
    assert record["weights"][arxiv] == pytest.approx(0.05)


@needs_paper_data
def test_long_targets_that_differ_past_the_folder_cut_get_their_own_models(tmp_path):
    model = tmp_path / "model"
    common = ",".join(f"metric/the_pile_{d}_val_loss=1" for d in ("github", "arxiv", "freelaw"))
    targets = [f"{common},{PILE_CC}=1", f"{common},{PILE_CC}=9"]
    assert main(["fit", "--mixtures", str(PAPER / "train_mixture_1m.csv"), "--losses",
                 str(PAPER / "train_pile_loss_1m.csv"), "--target", targets[0], "--target",
                 targets[1], "--model", "linear", "--out", str(model)]) == 0
    assert main(["predict", "--model", str(model), "--mixtures",
                 str(PAPER / "test_mixture_1m.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert len(rows[0]) == 3 and rows[1][1] != rows[1][2]  # two models, two predictions


def first_proxies(folder: Path, rows: int) -> tuple[Path, Path]:
    """The paper's first `rows` training proxies as a mixtures and a losses CSV."""
    mixtures, losses = folder / "m.csv", folder / "l.csv"
    for first_rows, name in ((mixtures, "train_mixture_1m.csv"), (losses, "train_pile_loss_1m.csv")):
        first_rows.write_text("".join((PAPER / name).open().readlines()[:rows + 1]))
    return mixtures, losses


@needs_paper_data
def test_a_failed_fit_leaves_the_model_folder_as_it_was(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 40)
    model = tmp_path / "model"
    fit = ["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "linear",
           "--out", str(model), "--target", PILE_CC]
    assert main(fit) == 0
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    # Other rows, and a second target that is unknown: refused before the first is fitted
    (tmp_path / "more").mkdir()
    more = first_proxies(tmp_path / "more", 50)
    refit = ["fit", "--mixtures", str(more[0]), "--losses", str(more[1]), *fit[5:]]
    assert main([*refit, "--target", "nope"]) == 2
    assert "unknown target column(s) ['nope']" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


@needs_paper_data
def test_fit_refuses_a_constant_target_before_fitting_and_writes_into_the_current_folder(
        tmp_path, capsys, monkeypatch):
    mixtures, losses = first_proxies(tmp_path, 30)
    rows = losses.read_text().splitlines()
    losses.write_text("\n".join([rows[0] + ",flat", *(row + ",3.5" for row in rows[1:])]) + "\n")
    fit = ["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "linear"]
    assert main([*fit, "--target", PILE_CC, "--target", "flat", "--out", str(tmp_path / "m")]) == 2
    assert "--target 'flat': the target is the same (3.5) on every row" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main([*fit, "--target", PILE_CC, "--out", "."]) == 0
    assert (tmp_path / "here" / "targets.json").is_file()
    # A folder without its training mixtures cannot be searched near them: said, not a traceback
    (tmp_path / "here" / "metric_the_pile_pile_cc_val_loss" / "train_weights.npy").unlink()
    assert main(["search", "--model", ".", "--out", "x.yaml"]) == 2
    assert "saved without its training mixtures" in capsys.readouterr().err


@needs_paper_data
def test_search_honours_the_max_epochs_cap_and_names_targets_as_fit_does(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 60)
    model, chosen = tmp_path / "model", tmp_path / "mixture.yaml"
    mean = f"{PILE_CC}=1,metric/the_pile_arxiv_val_loss=1"
    assert main(["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model",
                 "linear", "--target", mean, "--target", PILE_CC, "--out", str(model)]) == 0
    domains = read_proxy_csvs(mixtures).domains
    # pile_cc has tokens for 0.2 of a 1e9-token run at 2 epochs; the others plenty
    tokens = ",".join(f"{d}={1e8 if d.endswith('pile_cc') else 1e12:g}" for d in domains)
    # The same target written another way: same columns, shares in another order and scale
    same = f"metric/the_pile_arxiv_val_loss=0.5,{PILE_CC}=0.5"
    search = ["search", "--model", str(model), "--out", str(chosen), "--trials", "300",
              "--target", same, "--available-tokens", tokens, "--token-budget", "1e9",
              "--max-epochs", "2"]
    assert main(search) == 0
    record = yaml.safe_load(chosen.read_text())
    assert record["target"] == f"weighted_mean(metric/the_pile_arxiv_val_loss:0.5,{PILE_CC}:0.5)"
    assert record["weights"]["train_the_pile_pile_cc"] <= 0.2 + 1e-9
    assert record["bounds"]["train_the_pile_pile_cc"][1] == pytest.approx(0.2)
    assert record["constraints"]["max_epochs"] == 2
    # The cap needs all three settings
    assert main(search[:-2]) == 2
    assert "needs available_tokens, token_budget and max_epochs together" in capsys.readouterr().err


@needs_paper_data
def test_fit_says_when_auto_skipped_the_per_domain_fit(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 40)
    mean = ",".join(f"metric/the_pile_{d}_val_loss=1" for d in ("github", "arxiv", "pile_cc"))
    fit = ["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--target", mean,
           "--folds", "3", "--out", str(tmp_path / "model")]
    assert main([*fit, "--per-domain-max-seconds", "0"]) == 0
    assert "per-domain not tried: 3 parts would take about" in capsys.readouterr().out


@needs_paper_data
def test_a_spreadsheets_utf8_csv_with_a_byte_order_mark_reads(tmp_path):
    with_bom = tmp_path / "m.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (PAPER / "test_mixture_1m.csv").read_bytes())
    assert read_proxy_csvs(with_bom).weights.shape == (256, 17)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["fit", "--mixtures", "m.csv", "--losses", "l.csv", "--target", "t", "--out", "o",
          "--folds", "1"], "--folds: give an integer >= 2, not '1'"),
        (["fit", "--mixtures", "m.csv", "--losses", "l.csv", "--target", "t", "--out", "o",
          "--per-domain-max-seconds", "-1"], "--per-domain-max-seconds: give an integer >= 0"),
        (["search", "--model", "m", "--out", "o", "--seed", "-1"],
         "--seed: give an integer in [0, 4294967295], not '-1'"),
        (["fit", "--mixtures", "m.csv", "--losses", "l.csv", "--target", "t", "--out", "o",
          "--seed", str(2**32)], "--seed: give an integer in [0, 4294967295]"),
        (["fit", "--mixtures", "m.csv", "--losses", "l.csv", "--target", "t", "--out",
          f"{__file__}/model"], f"--out: '{__file__}' is a file; give a folder path"),
        (["search", "--model", "m", "--out", "o", "--max-epochs", "0"],
         "--max-epochs: give a number > 0, not '0'"),
        (["search", "--model", "m", "--out", "o", "--trials", "20"],
         "--trials: give an integer >= 128, not '20'"),
        (["search", "--model", "m", "--out", "o", "--fixed", "a=0.1", "--fixed", "a=0.2"],
         "--fixed: ['a'] given twice"),
        (["search", "--model", "m", "--out", "o", "--max-weight", "a"],
         "--max-weight: 'a': give DOMAIN=WEIGHT"),
        (["search", "--model", "m", "--out", "o", "--min-weight", "a=0.1,a=0.2"],
         "'a' is given twice"),
        (["search", "--model", "m", "--out", ".", "--max-weight", "a=0.1"],
         "--out: '.' is a folder; give a file path"),
        (["predict", "--model", "m", "--mixtures", "m.csv", "--out", "nowhere/p.csv"],
         "--out: no folder 'nowhere' to write 'p.csv' in"),
        (["compile", "--config", "c.yaml", "--out", "pipeline.json"], "give a .yaml file"),
        (["run", "--config", "c.yaml", "--summary-json", "."], "'.' is a folder"),
    ],
)
def test_bad_flags_are_refused_before_any_work(capsys, command, message):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def log_proxy(tracking, i: int, weights, tokens_budget: int = 1000, corpus: str = "f1",
              stage: str = "proxy") -> None:
    with stage_run(tracking, stage, f"{stage}-m{i}", {HASH_TAG: f"h{i}", CORPUS_TAG: corpus}):
        mlflow.log_params({f"weight.{d}": w for d, w in zip("abc", weights, strict=True)})
        mlflow.log_params({"mixture_id": f"m{i:04d}", "model.n_layer": 2,
                           "train.tokens": tokens_budget})
        mlflow.log_metrics({f"val_loss.{d}": 3 + i for d in "abc"})


def test_export_writes_the_paper_format_from_mlflow(tmp_path, tracking, capsys):
    rng = np.random.default_rng(0)
    for i, weights in enumerate(rng.dirichlet([1, 1, 1], 5)):
        log_proxy(tracking, i, weights)
    mixtures, losses = tmp_path / "m.csv", tmp_path / "l.csv"
    export = ["export", "--experiment", "regmix-test", "--tracking-uri", tracking["uri"],
              "--mixtures", str(mixtures), "--losses", str(losses)]
    assert main(export) == 0

    table = read_proxy_csvs(mixtures)  # the exported CSVs read back as valid input
    assert table.domains == ["a", "b", "c"] and len(table.index) == 5
    rows = list(csv.DictReader(losses.open()))
    assert [float(r["val_loss.a"]) for r in rows] == [3, 4, 5, 6, 7]
    assert [r["mixture_id"] for r in rows] == [f"m{i:04d}" for i in range(5)]  # the MLflow runs'
    assert read_proxy_csvs(mixtures, losses).targets == ["mixture_id", "val_loss.a", "val_loss.b",
                                                          "val_loss.c"]
    # Active-learning proxies are fitted on too (exported by default); gate proxies are not
    log_proxy(tracking, 7, [0.1, 0.1, 0.8], stage="active-proxy")
    log_proxy(tracking, 8, [0.1, 0.8, 0.1], stage="gate-proxy")
    assert main(export) == 0 and len(read_proxy_csvs(mixtures).index) == 6
    assert main([*export, "--stage", "proxy"]) == 0 and len(read_proxy_csvs(mixtures).index) == 5
    assert main([*export, "--stage", "proxy", "--stage", "gate-proxy"]) == 0
    assert len(read_proxy_csvs(mixtures).index) == 6
    capsys.readouterr()
    # Proxies trained on another token budget, or other data (a retrained tokenizer, say), are
    # not rows of the same regression
    log_proxy(tracking, 5, [0.2, 0.3, 0.5], tokens_budget=2000)
    assert main(export) == 2
    assert "mixes proxies of 2 settings" in capsys.readouterr().err
    other_budget = next(r for r in proxy_runs(tracking["uri"], "regmix-test") if r["id"] == "m0005")
    mlflow.MlflowClient(tracking["uri"]).delete_run(other_budget["run_id"])
    assert main(export) == 0
    log_proxy(tracking, 6, [0.2, 0.3, 0.5], corpus="f2")
    assert main(export) == 2
    assert "mixes proxies of 2 settings" in capsys.readouterr().err


@needs_paper_data
def test_fit_names_the_rows_it_left_out_by_their_index(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 100)
    header, *rows = losses.read_text().splitlines()
    column = header.split(",").index(PILE_CC)
    cells = rows[41].split(",")
    cells[column] = str(float(cells[column]) + 1.0)  # a run gone wrong
    losses.write_text("\n".join([header, *rows[:41], ",".join(cells), *rows[42:]]) + "\n")
    assert main(["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "gp",
                 "--target", PILE_CC, "--out", str(tmp_path / "model")]) == 0
    named = re.search(r"left out \d+ rows whose loss CV could not predict \(index ([^)]*)\)",
                      capsys.readouterr().out)
    assert cells[0] in named.group(1).split(", ")  # the CSV's own index, not a row number


@needs_paper_data
def test_a_damaged_or_outdated_model_folder_is_refused_in_one_line(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 40)

    def fitted(model: str) -> tuple[list[str], Path]:
        folder = tmp_path / model
        assert main(["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model",
                     model, "--target", PILE_CC, "--out", str(folder)]) == 0
        predict = ["predict", "--model", str(folder), "--mixtures", str(mixtures), "--out",
                   str(tmp_path / "p.csv")]
        return predict, next((folder / "metric_the_pile_pile_cc_val_loss").glob(f"*_{model}"))

    predict, member = fitted("gp")
    (member / "kernel.json").write_text('{"theta": [1, 2, 0.3, -6.9]}')  # an early, smaller kernel
    assert main(predict) == 2
    assert "kernel.json: the kernel's hyperparameters do not fit this version's GP" in \
        capsys.readouterr().err
    predict, member = fitted("lightgbm")
    whole = (member / "model.txt").read_text()
    search = ["search", "--model", predict[2], "--out", str(tmp_path / "s.yaml")]
    # Cut short, some LightGBM files abort the process from C++ (no Python error to catch)
    for damaged, message in (("garbage\nend of trees\n", "unreadable model folder (LightGBMError"),
                             (whole[:2000], "model.txt is incomplete (no 'end of trees')")):
        (member / "model.txt").write_text(damaged)
        for command in (predict, search):
            assert main(command) == 2
            assert message in capsys.readouterr().err
    (Path(predict[2]) / "targets.json").write_text("{}")
    assert main(predict) == 2
    assert "targets.json names no targets" in capsys.readouterr().err


def test_a_model_that_predicts_nan_writes_no_prediction_and_no_mixture(tmp_path, capsys):
    """Fault drill: a model folder fitted on an overflowed loss (an older regmix let one
    through) predicts nan: predict and search refuse in one line and write nothing."""
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(3), 12)
    (tmp_path / "m.csv").write_text("index,a,b,c\n" + "".join(
        f"{i},{','.join(f'{w:.6f}' for w in row)}\n" for i, row in enumerate(weights)))
    (tmp_path / "l.csv").write_text("index,loss\n" + "".join(
        f"{i},{3 + row[0]:.4f}\n" for i, row in enumerate(weights)))
    model = tmp_path / "model"
    assert main(["fit", "--mixtures", str(tmp_path / "m.csv"), "--losses", str(tmp_path / "l.csv"),
                 "--target", "loss", "--model", "linear", "--out", str(model)]) == 0
    member = model / "loss" / "0_linear" / "linear.json"
    member.write_text(member.read_text().replace('"intercept": ', '"intercept": NaN, "was": '))
    for command, out in (("predict", "p.csv"), ("search", "s.yaml")):
        inputs = ["--mixtures", str(tmp_path / "m.csv")] if command == "predict" else []
        capsys.readouterr()
        assert main([command, "--model", str(model), *inputs, "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert "target 'loss' predicts nan" in err and "fit the model again" in err, err
        assert not (tmp_path / out).exists()


@needs_paper_data
def test_a_target_named_twice_or_like_a_folder_link_is_refused(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 30)
    header, *rows = losses.read_text().splitlines()
    losses.write_text("\n".join([f"{header},..", *(f"{row},{i}" for i, row in enumerate(rows))]))
    fit = ["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "linear",
           "--out", str(tmp_path / "model")]
    assert main([*fit, "--target", PILE_CC, "--target", PILE_CC]) == 2
    assert f"--target '{PILE_CC}': given twice" in capsys.readouterr().err
    assert main([*fit, "--target", ".."]) == 0  # a folder of its own, inside --out
    assert (tmp_path / "model" / "target" / "regressor.json").is_file()


@needs_paper_data
def test_fit_replaces_only_what_it_wrote_and_outputs_never_overwrite_inputs(tmp_path, capsys):
    mixtures, losses = first_proxies(tmp_path, 30)
    header, *rows = losses.read_text().splitlines()
    columns = ["val_loss(step=1000)", "targets.json", "notes"]  # a column may hold '='
    losses.write_text("\n".join([f"{header},{','.join(columns)}",
                                 *(f"{row},{i},{i},{i}" for i, row in enumerate(rows))]))
    model = tmp_path / "model"
    (model / "notes").mkdir(parents=True)
    (model / "notes" / "mine.txt").write_text("keep me")
    fit = ["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "linear",
           "--out", str(model), "--target"]
    assert main([*fit, "notes"]) == 2  # a column named like the user's own folder
    assert "model/notes' (target 'notes') exists and is not a model `regmix fit` wrote" in \
        capsys.readouterr().err
    assert (model / "notes" / "mine.txt").read_text() == "keep me"
    assert main([*fit, "targets.json"]) == 2
    assert "is a file `regmix fit` writes beside the targets' folders" in capsys.readouterr().err
    assert main([*fit, "val_loss(step=1000)"]) == 0
    assert main([*fit, "val_loss(step=1000)"]) == 0  # its own folder: replaced
    # predict and search never write over their input or into the model folder
    assert main(["predict", "--model", str(model), "--mixtures", str(mixtures), "--out",
                 str(mixtures)]) == 2
    assert "is the --mixtures file" in capsys.readouterr().err
    target_folder = model / "val_loss_step_1000"
    for command, args in (("predict", ["--mixtures", str(mixtures)]), ("search", [])):
        for out in (model / "targets.json", target_folder / "x.csv"):
            assert main([command, "--model", str(model), *args, "--out", str(out)]) == 2
            assert "would overwrite the model `regmix fit` wrote" in capsys.readouterr().err
    # Beside the model's own files is fine (the model folder may be the working folder)
    assert main(["search", "--model", str(model), "--out", str(model / "s.yaml"),
                 "--target", "val_loss(step=1000)"]) == 0
    assert (target_folder / "regressor.json").is_file()


@needs_paper_data
def test_a_mixture_a_proxy_was_trained_on_gains_nothing_over_it(tmp_path, capsys):
    """The gain over the best proxy compares two predictions: a model that misses that proxy's
    measured loss (a linear one on 40 rows does, by far) must not call its own error a gain."""
    mixtures, losses = first_proxies(tmp_path, 40)
    model, chosen = tmp_path / "model", tmp_path / "mixture.yaml"
    github = "metric/the_pile_github_val_loss"
    assert main(["fit", "--mixtures", str(mixtures), "--losses", str(losses), "--model", "linear",
                 "--target", github, "--out", str(model)]) == 0
    fitted = Regressor.load(model / "metric_the_pile_github_val_loss")
    best = fitted.train_weights[fitted.fit_summary["best_train_row"]]
    fixed = ",".join(f"{d}={w!r}" for d, w in zip(fitted.domains, best.tolist(), strict=True))
    assert main(["search", "--model", str(model), "--out", str(chosen), "--trials", "128",
                 "--method", "paper", "--fixed", fixed, "--allow-extrapolation"]) == 0
    text = chosen.read_text()
    gain = yaml.safe_load(text)["predicted_gain"]
    assert abs(gain["over_best_training_proxy"]) < 1e-6 and gain["verdict"] == "within the CV error"
    assert "*id" not in text  # the recipe's weights written out, not as a YAML alias


def test_export_refuses_one_file_for_both_tables(tmp_path, tracking, capsys):
    log_proxy(tracking, 0, [0.2, 0.3, 0.5])
    same = str(tmp_path / "both.csv")
    assert main(["export", "--experiment", "regmix-test", "--tracking-uri", tracking["uri"],
                 "--mixtures", same, "--losses", same]) == 2
    assert "--mixtures and --losses are both" in capsys.readouterr().err
