"""The report from hand-written rows: the expected table, the best configuration, the figures."""

import json

import pandas as pd
import pytest

from experiments.methods import method_name
from experiments.report import write_report
from experiments.tables import load_results, summarize
from fed_app.config import RunConfig


def _run(root, name, rows, done=True, **cfg):
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(RunConfig(**cfg).to_dict()))
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (path / "DONE").write_text("")


def _epochs(val, test):
    return [{"epoch": e, "val_accuracy": v, "val_loss": 1 - v, "test_accuracy": t, "test_loss": 1 - t}
            for e, (v, t) in enumerate(zip(val, test), start=1)]


def _centralized_grid(tmp_path):
    _run(tmp_path, "centralized-a", _epochs([0.5, 0.7], [0.48, 0.66]), lr=0.01, seed=1)
    _run(tmp_path, "centralized-b", _epochs([0.5, 0.6], [0.50, 0.62]), lr=0.01, seed=2)
    _run(tmp_path, "centralized-c", _epochs([0.8, 0.75], [0.70, 0.72]), lr=0.1, seed=1)
    _run(tmp_path, "centralized-d", _epochs([0.2], [0.9]), lr=0.3, seed=1, done=False)  # best test, bad val


def test_summary_means_over_seeds_and_the_best_configuration_at_the_final_checkpoint(tmp_path):
    _centralized_grid(tmp_path)
    df = load_results(tmp_path)
    assert len(df) == 7 and set(df["kind"]) == {"centralized"}
    summary = summarize(df, rule="final").set_index("run_id")
    assert summary.loc["centralized-c", "val_accuracy"] == 0.75 and summary.loc["centralized-c", "checkpoint"] == 2
    assert summary.loc["centralized-c", "test_accuracy"] == 0.72
    report = write_report(tmp_path)
    by_config = pd.read_csv(tmp_path / "by_config.csv").set_index("lr")
    assert by_config.loc[0.01, "test_accuracy_mean"] == pytest.approx(0.64)
    assert by_config.loc[0.01, "test_accuracy_std"] == pytest.approx(0.0282843, abs=1e-6)
    assert by_config.loc[0.01, "n"] == 2
    text = report.read_text()
    assert "Checkpoint rule `final`" in text
    assert ("**Best centralized configuration by validation accuracy:** lr=0.1: validation 75.00 (n=1), "
            "test 72.00 (n=1).") in text
    assert "| 64.00 ± 2.83 (n=2) |" in text  # lr=0.01: mean ± std over its two seeds
    assert (tmp_path / "figures" / "curves_centralized.png").stat().st_size > 0
    assert (tmp_path / "figures" / "accuracy_by_lr.png").exists()


def test_best_val_rule_selects_and_reports_the_same_step(tmp_path):
    _centralized_grid(tmp_path)
    summary = summarize(load_results(tmp_path), rule="best-val").set_index("run_id")
    assert summary.loc["centralized-c", "checkpoint"] == 1  # its best validation epoch...
    assert summary.loc["centralized-c", "test_accuracy"] == 0.70  # ...and the test accuracy of that epoch
    default = write_report(tmp_path).read_text()
    report = write_report(tmp_path, rule="best-val")
    assert report.name == "report-best-val.md" and "lr=0.1: validation 80.00 (n=1), test 70.00 (n=1)." in report.read_text()
    assert (tmp_path / "report.md").read_text() == default  # written beside the default report, not over it
    assert (tmp_path / "summary-best-val.csv").exists() and (tmp_path / "figures-best-val").is_dir()
    assert "](figures-best-val/" in report.read_text() and "](figures/" in default


def test_a_run_is_labelled_only_by_the_keys_that_apply_to_it(tmp_path):
    start = {"round": 0, "val_accuracy": 0.1, "test_accuracy": 0.1, "test_loss": 2.0}
    for name, opt, sparsity in (("dense", "sgdm", 0.9), ("s5", "sparse-sgdm", 0.5), ("s9", "sparse-sgdm", 0.9)):
        rows = [start, {"round": 1, "val_accuracy": sparsity / 2, "test_accuracy": sparsity / 2, "test_loss": 1.0}]
        _run(tmp_path, f"federated-{name}", rows, optimizer=opt, head="ridge", sparsity=sparsity)
    df = load_results(tmp_path)
    dense = df[df["run_id"] == "federated-dense"].iloc[0]
    assert pd.isna(dense["sparsity"]) and pd.isna(dense["epochs"]) and pd.isna(dense["scheduler"])
    write_report(tmp_path)
    by_config = pd.read_csv(tmp_path / "by_config.csv")
    assert by_config["step0_test_accuracy_mean"].tolist() == [0.1, 0.1, 0.1]
    assert (tmp_path / "figures" / "accuracy_by_sparsity.png").exists()  # the dense run drawn as its control


def test_a_federated_grid_gets_the_heterogeneity_heatmap_and_bytes(tmp_path):
    for nc in (1, 5):
        for j in (4, 8):
            rows = [{"round": 0, "val_accuracy": 0.01, "test_accuracy": 0.01, "test_loss": 4.6, "bytes_received": 500,
                     "wall_time": 2.0},  # step 0's queries
                    {"round": 1, "train_loss": 4.0, "bytes_received": 1000 * j, "val_accuracy": nc / 10,
                     "test_accuracy": nc / 10 + j / 100, "test_loss": 3.0, "wall_time": 5.0}]
            _run(tmp_path, f"federated-{nc}-{j}", rows, partition="noniid", classes_per_client=nc, local_steps=j)
    write_report(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(summary["test_accuracy"].round(2)) == [0.14, 0.18, 0.54, 0.58]
    assert (tmp_path / "figures" / "heatmap_shards_by_local_steps.png").exists()
    assert (tmp_path / "figures" / "bytes_per_round.png").exists()
    summary = summary.set_index("run_id")  # the whole bill: step 0 included, not only the rounds
    assert summary.loc["federated-5-8", "upload_total"] == 8500 and summary.loc["federated-5-8", "upload_step0"] == 500
    assert summary.loc["federated-5-8", "bytes_per_round"] == 8000
    assert (tmp_path / "figures" / "accuracy_by_cost.png").exists()


def test_a_missing_or_empty_results_folder_is_one_sentence_and_exit_2(tmp_path):
    import subprocess
    import sys

    for folder in (tmp_path / "nowhere", tmp_path):
        proc = subprocess.run([sys.executable, "-m", "experiments", "report", str(folder)], capture_output=True,
                              text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
        assert str(folder) in proc.stderr


def test_one_clients_x_classes_figure_per_distinct_partition(tmp_path):
    from experiments.figures import client_classes

    def run(name, **changes):
        cfg = RunConfig(partition="dirichlet", dirichlet_alpha=0.1, num_clients=3, **changes)
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        (folder / "shards.json").write_text(json.dumps({"class_counts": [[5, 0, 1], [0, 7, 0], [2, 2, 2]]}))

    run("a", lr=0.01)
    run("b", lr=0.1)  # the same partition under another lr: no second figure
    run("c", seed=7)
    run("d", seed=7, val_size=100)  # another split, drawn the same way: one figure, listed once
    out = tmp_path / "figures"
    out.mkdir()
    made = client_classes(tmp_path, out)
    assert sorted(p.name for p in made) == ["clients_x_classes_Dirichlet_alpha0.1_3clients_seed42.png",
                                            "clients_x_classes_Dirichlet_alpha0.1_3clients_seed7.png"]
    assert all(p.stat().st_size > 0 for p in made)


def test_mask_densities_per_block_one_line_per_configuration(tmp_path):
    from experiments.figures import _block, block_densities, mask_layers

    assert _block("blocks.3.attn.qkv.weight") == "blocks.3" and _block("patch_embed.proj.weight") == "patch_embed"
    assert mask_layers(tmp_path, tmp_path) is None  # no sparse run, no figure
    stats = [{"name": "blocks.0.w", "numel": 10, "trainable": 1, "density": 0.1},
             {"name": "blocks.1.w", "numel": 10, "trainable": 5, "density": 0.5},
             {"name": "blocks.1.b", "numel": 10, "trainable": 0, "density": 0.0},
             {"name": "total", "numel": 30, "trainable": 6, "density": 0.2}]
    assert block_densities(stats) == {"blocks.0": 0.1, "blocks.1": 0.25}
    for name, rule in (("federated-a", "vote"), ("federated-b", "union")):
        folder = tmp_path / name
        folder.mkdir()
        cfg = RunConfig(optimizer="sparse-sgdm", head="ridge", mask_aggregation=rule)
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        (folder / "mask_stats.json").write_text(json.dumps(stats))
    out = tmp_path / "figures"
    out.mkdir()
    made = mask_layers(tmp_path, out)
    assert made == out / "mask_density_per_block.png" and made.stat().st_size > 0


def test_remedies_get_a_method_by_heterogeneity_table_and_figure(tmp_path):

    methods = {"fedavg": {}, "prox": {"prox_mu": 0.01}, "adam": {"server_optimizer": "fedadam", "server_lr": 0.01},
               "scaffold": {"client_algorithm": "scaffold"}}
    levels = {"nc1": {"partition": "noniid", "classes_per_client": 1},
              "dir": {"partition": "dirichlet", "dirichlet_alpha": 0.5}}
    for m, (method, settings) in enumerate(methods.items()):
        for lv, (level, skew) in enumerate(levels.items()):
            for seed in (1, 2):
                acc = 0.1 * (m + 1) + 0.4 * lv + 0.01 * seed
                rows = [{"round": 0, "val_accuracy": 0.01, "test_accuracy": 0.01, "test_loss": 4.6},
                        {"round": 1, "val_accuracy": acc, "test_accuracy": acc, "test_loss": 1.0}]
                _run(tmp_path, f"federated-{method}-{level}-{seed}", rows, seed=seed, **settings, **skew)
    text = write_report(tmp_path).read_text()
    table = text.split("## Test accuracy per method and heterogeneity level")[1].split("##")[0]
    assert "| method | Nc=1 | Dirichlet alpha=0.5 |" in table  # most skewed first
    lines = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert lines[0].startswith("| FedAvg | 11.50 ± 0.71 (n=2) | 51.50 ± 0.71 (n=2) |")  # FedAvg first
    assert {line.split(" | ")[0][2:] for line in lines} == {"FedAvg", "FedProx mu=0.01", "FedAdam", "SCAFFOLD"}
    assert "| SCAFFOLD | 41.50 ± 0.71 (n=2) | 81.50 ± 0.71 (n=2) |" in table
    assert (tmp_path / "figures" / "accuracy_by_method_and_heterogeneity.png").stat().st_size > 0
    both = pd.Series({"client_algorithm": "scaffold", "server_optimizer": "fedadam", "prox_mu": 0.0})
    assert method_name(both) == "SCAFFOLD + FedAdam"


def test_a_diverged_run_loses_every_selection_and_is_listed_apart(tmp_path):
    _centralized_grid(tmp_path)
    # lr=1.0 has the best validation accuracy of all, but the divergence guard stopped it
    _run(tmp_path, "centralized-e", _epochs([0.95], [0.95]), lr=1.0, seed=1, done=False)
    (tmp_path / "centralized-e" / "DIVERGED").write_text("train_loss is nan at epoch 2")
    text = write_report(tmp_path).read_text()
    assert "5 runs (3 finished, 1 diverged)" in text
    assert "**Best centralized configuration by validation accuracy:** lr=0.1:" in text
    assert "## Diverged runs (1)" in text and "| centralized-e | 1 | train_loss is nan at epoch 2 |" in text
    by_config = pd.read_csv(tmp_path / "by_config.csv").set_index("lr")
    assert by_config.loc[1.0, "diverged"] == 1 and by_config.loc[0.1, "diverged"] == 0


def test_a_winner_at_the_edge_of_its_grid_is_flagged_with_the_value_to_add(tmp_path):
    for i, (lr, val) in enumerate([(0.001, 0.5), (0.01, 0.6), (0.1, 0.7)]):
        _run(tmp_path, f"centralized-{i}", _epochs([val], [val]), lr=lr, seed=1)
    text = write_report(tmp_path).read_text()
    assert "**At the edge of its grid:** lr=0.1 is the highest tried; add 1." in text
    (tmp_path / "centralized-2" / "rows.jsonl").write_text(json.dumps(_epochs([0.55], [0.55])[0]) + "\n")
    assert "edge of its grid" not in write_report(tmp_path).read_text()  # lr=0.01 won: inside the grid
    # weight decay tried at three values, but only under lr=1.0: not the winner's sub-grid, so no flag for it
    for i, wd in enumerate([0.001, 0.01, 0.1]):  # the winner (lr=0.01) has the lowest weight decay of all runs
        _run(tmp_path, f"centralized-wd{i}", _epochs([0.3], [0.3]), lr=1.0, weight_decay=wd, seed=1)
    assert "edge of its grid" not in write_report(tmp_path).read_text()
    # step-size varies now (it applies to step runs only): the winner's, empty, still picks its own sub-grid
    for i, lr in enumerate([0.3, 3.0]):
        _run(tmp_path, f"centralized-step{i}", _epochs([0.1], [0.1]), lr=lr, scheduler="step", seed=1)
    _run(tmp_path, "centralized-top", _epochs([0.99], [0.99]), lr=1.0, seed=2)
    assert "lr=1 is the highest tried; add 10" in write_report(tmp_path).read_text()


def test_edge_winners_compare_within_the_winners_sub_grid_where_another_key_is_empty():
    from experiments.selection import edge_winners

    rows = pd.DataFrame({"lr": [0.01, 0.1, 1.0, 0.01, 0.1], "step_size": [None, None, None, 2.0, 3.0]})
    assert edge_winners(rows, rows.iloc[2], ["lr", "step_size"]) == ["lr=1 is the highest tried; add 10"]


def _per_axis_figure(monkeypatch, tmp_path, summary, axis, axes):
    """per_axis's figure, caught before it is closed (None when it draws none)."""
    from experiments import figures

    closed = []
    monkeypatch.setattr(figures.plt, "close", lambda fig=None: closed.append(fig))
    path = figures.per_axis(summary, axis, axes, tmp_path)
    return (path, closed[-1]) if path is not None else (None, None)


def test_a_per_axis_figure_compares_only_runs_that_differ_in_that_axis(monkeypatch, tmp_path):
    rows = [  # lr swept at J=4 (one seed); J=8 ran at one lr only; optimizer and head change together
        ("a", 0.001, 4, "sgdm", "none", 1, 0.50), ("b", 0.01, 4, "sgdm", "none", 1, 0.60),
        ("c", 0.1, 4, "sgdm", "none", 1, 0.55), ("d", 0.01, 8, "sparse-sgdm", "ridge", 1, 0.70)]
    summary = pd.DataFrame(rows, columns=["run_id", "lr", "local_steps", "optimizer", "head", "seed",
                                          "test_accuracy"]).assign(kind="federated")
    axes = ["lr", "local_steps", "optimizer", "head"]
    path, fig = _per_axis_figure(monkeypatch, tmp_path, summary, "lr", axes)
    ax = fig.axes[0]
    assert path.name == "accuracy_by_lr.png" and ax.get_xscale() == "log"  # lr spans a factor of 100
    (line,) = ax.get_lines()  # the J=4 sweep, as one line; J=8's single lr is no comparison
    assert list(line.get_xdata()) == [0.001, 0.01, 0.1]
    assert not any(c.has_yerr for c in ax.containers) and "one seed" in ax.get_ylabel()
    assert _per_axis_figure(monkeypatch, tmp_path, summary, "optimizer", axes) == (None, None)  # confounded
    assert _per_axis_figure(monkeypatch, tmp_path, summary, "head", axes) == (None, None)
    two = pd.concat([summary, summary.assign(seed=2, test_accuracy=summary["test_accuracy"] + 0.02)], ignore_index=True)
    _, fig = _per_axis_figure(monkeypatch, tmp_path, two, "lr", axes + ["seed"])
    assert any(c.has_yerr for c in fig.axes[0].containers) and "n=2 seeds" in fig.axes[0].get_ylabel()


def test_each_run_keeps_one_colour_across_figures(monkeypatch, tmp_path):
    from matplotlib.colors import to_hex

    from experiments import figures

    closed = []
    monkeypatch.setattr(figures.plt, "close", lambda fig=None: closed.append(fig))
    runs = {"federated-b": 0.01, "federated-a": 0.1, "federated-c": 0.001}  # listed out of order on purpose
    df = pd.DataFrame([{"run_id": r, "kind": "federated", "lr": lr, "step": s, "test_accuracy": 0.1 * s,
                        "test_loss": 1.0 / (s + 1)} for r, lr in runs.items() for s in range(3)])
    summary = pd.DataFrame([{"run_id": r, "kind": "federated", "lr": lr, "bytes_per_round": 2**20 * (i + 1)}
                            for i, (r, lr) in enumerate(runs.items())])
    figures.curves(df, ["lr"], "federated", tmp_path)
    figures.bytes_per_round(summary, ["lr"], tmp_path)
    lines = {line.get_label(): to_hex(line.get_color()) for line in closed[0].axes[1].get_lines()}
    bars = closed[1].axes[0]
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert {label: to_hex(bar.get_facecolor()) for label, bar in zip(labels, bars.patches)} == lines
    assert len(set(lines.values())) == 3


def test_a_dp_grid_reports_the_epsilon_each_configuration_spent(tmp_path):
    for sigma, eps in ((0.5, 9.5), (2.0, 1.25)):
        for seed in (1, 2):
            rows = [{"round": 0, "val_accuracy": 0.01, "test_accuracy": 0.01, "test_loss": 4.6},
                    {"round": 1, "train_loss": 4.0, "epsilon": eps / 2, "clipped": 3, "attackers": 0},
                    {"round": 2, "train_loss": 3.0, "epsilon": eps, "clipped": 2, "attackers": 1,
                     "val_accuracy": 0.3 / sigma, "test_accuracy": 0.3 / sigma, "test_loss": 3.0}]
            _run(tmp_path, f"federated-{sigma}-{seed}", rows, dp="server-fixed", dp_noise_multiplier=sigma, seed=seed)
    text = write_report(tmp_path).read_text()
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("run_id")
    assert summary.loc["federated-2.0-1", "epsilon"] == 1.25  # at the checkpoint the rule selected
    assert "| epsilon (fine-tuning rounds) |" in text and "| 9.5 |" in text and "| 1.25 |" in text
    assert "clipped" not in pd.read_csv(tmp_path / "by_config.csv").columns  # a metric, not a configuration key


def _threat_summary():
    """Two optimizers x noise multipliers {1, 4} x seeds {1, 2}, with their runs without DP; sgdm at 4 diverges
    at seed 2 (and spent less: it stopped early)."""
    runs = []
    for opt, base in (("sgdm", 0.60), ("sparse-sgdm", 0.65)):
        for seed in (1, 2):
            runs.append({"optimizer": opt, "seed": seed, "dp": "none", "dp_noise_multiplier": None,
                         "epsilon": None, "test_accuracy": base + 0.1, "diverged": None})
            for sigma, eps, loss in ((1.0, 8.0, 0.05), (4.0, 1.0, 0.30)):
                gone = opt == "sgdm" and sigma == 4.0 and seed == 2
                runs.append({"optimizer": opt, "seed": seed, "dp": "server-fixed", "dp_noise_multiplier": sigma,
                             "epsilon": 0.4 if gone else eps, "test_accuracy": 0.1 if gone else base - loss + 0.01 * seed,
                             "diverged": "val_loss stayed above" if gone else None})
    return pd.DataFrame(runs).assign(kind="federated", run_id=[f"r{i}" for i in range(len(runs))])


def test_a_dp_grid_draws_accuracy_against_the_epsilon_spent_beside_each_arm_without_dp(monkeypatch, tmp_path):
    from experiments import threat_figures

    closed = []
    monkeypatch.setattr(threat_figures.plt, "close", lambda fig=None: closed.append(fig))
    summary = _threat_summary()
    (path,) = threat_figures.threat_figures(summary, ["dp", "dp_noise_multiplier", "optimizer", "seed"], tmp_path)
    ax = closed[-1].axes[0]
    assert path.name == "accuracy_against_epsilon.png" and ax.get_xscale() == "log"
    curves = {c.get_label(): c.lines[0] for c in ax.containers}  # the errorbar plots
    sgdm, sparse = curves["optimizer=sgdm"], curves["optimizer=sparse-sgdm"]
    assert list(sgdm.get_xdata()) == [1.0, 8.0] and list(sparse.get_xdata()) == [1.0, 8.0]  # not the diverged 0.4
    assert list(sgdm.get_ydata()) == pytest.approx([100 * (0.30 + 0.01), 100 * (0.55 + 0.015)])  # seed 1 only at 4
    assert list(sparse.get_ydata()) == pytest.approx([100 * 0.365, 100 * 0.615])
    controls = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"}
    assert controls == pytest.approx({"optimizer=sgdm, no DP": 70.0, "optimizer=sparse-sgdm, no DP": 75.0})
    assert [t.get_text() for t in ax.texts] == ["1 diverged"]


def test_rules_and_attacks_draw_one_heatmap_per_optimizer_with_the_diverged_runs_counted(monkeypatch, tmp_path):
    from experiments import threat_figures

    closed = []
    monkeypatch.setattr(threat_figures.plt, "close", lambda fig=None: closed.append(fig))
    runs = [{"aggregation": rule, "attack": attack, "attack_fraction": None if attack == "none" else 0.2,
             "optimizer": opt, "seed": seed, "test_accuracy": acc + 0.01 * seed,
             "diverged": "blew up" if acc == 0 else None}
            for opt in ("sgdm", "sparse-sgdm") for seed in (1, 2)
            for rule, attack, acc in (("fedavg", "none", 0.7), ("fedavg", "sign-flip", 0.0), ("median", "none", 0.6),
                                      ("median", "sign-flip", 0.5))]
    summary = pd.DataFrame(runs).assign(kind="federated")
    axes = ["aggregation", "attack", "attack_fraction", "optimizer", "seed"]
    (path,) = threat_figures.threat_figures(summary, axes, tmp_path)
    assert path.name == "accuracy_by_rule_and_attack.png"
    panels = [ax for ax in closed[-1].axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["optimizer=sgdm", "optimizer=sparse-sgdm"]
    cells = [t.get_text() for t in panels[0].texts]  # rows fedavg, median; columns none, sign-flip 20%
    assert cells == ["71.5\n±0.7", "2 diverged", "61.5\n±0.7", "51.5\n±0.7"]
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["none", "sign-flip 20%"]
    assert threat_figures.threat_figures(summary[summary["attack"] == "none"], axes, tmp_path) == []
