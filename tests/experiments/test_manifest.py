"""Manifests: expansion counts, stable ids, every shipped manifest valid, one-sentence errors."""

import json
from pathlib import Path

import pytest

from experiments.manifest import ManifestError, load_manifest

SHIPPED = sorted(Path(__file__).resolve().parents[2].joinpath("experiments", "manifests").glob("*.yaml"))


def _write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_grid_expands_to_its_cross_product_times_seeds_with_run_dirs_under_results(tmp_path):
    m = load_manifest(_write(tmp_path, """
name: g
kind: federated
base: {num-rounds: 10}
grid:
  - {partition: [noniid], classes-per-client: [1, 5, 10, 50], local-steps: [4, 8, 16]}
  - {partition: [iid], local-steps: [4, 8, 16]}
seeds: [1, 2]
rounds-scaling: true
"""), results=tmp_path / "results")
    assert len(m.runs) == (12 + 3) * 2
    assert m.axes == ("partition", "classes-per-client", "local-steps", "seed")
    j16 = [r for r in m.runs if r.cfg.local_steps == 16]
    assert all(r.cfg.total_rounds == 2 for r in j16)  # 10 rounds at J=4 -> 2.5 -> 2 at J=16
    assert all(Path(r.cfg.run_dir) == (tmp_path / "results" / "g" / r.run_id).resolve() for r in m.runs)


def test_run_ids_are_stable_whatever_the_key_order(tmp_path):
    a = load_manifest(_write(tmp_path, "name: a\nkind: centralized\nbase: {lr: 0.1, epochs: 2}\ngrid: {seed: [1]}\n", "a.yaml"))
    b = load_manifest(_write(tmp_path, "name: a\nkind: centralized\nbase: {epochs: 2, lr: 0.1}\ngrid: {seed: [1]}\n", "b.yaml"))
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    assert a.runs[0].run_id.startswith("centralized-")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_manifest_validates(path):
    assert len(load_manifest(path, resolve_tuned=False).runs) >= 1


def test_the_shipped_studies_have_the_sizes_seeds_and_controls_the_protocol_states():
    loaded = {p.stem: load_manifest(p, resolve_tuned=False) for p in SHIPPED}
    counts = {name: len(m.runs) for name, m in loaded.items()}
    assert counts["noniid_grid"] == 15 * 3 and counts["schedulers"] == 5 * 3 and counts["mask_rules"] == 19 * 3
    assert counts["sparse_grid"] == 16 * 3 and counts["fedavg_lr"] == 18 and counts["centralized_search"] == 28
    assert counts["heterogeneity_remedies"] == 4 * 5 * 3 and counts["remedies_tuning"] == 9  # 4 levels x 5 methods
    assert counts["sparse_lr"] == 5 * 5 + 4 * 5 + 5 and counts["head_control"] == 4 * 3
    assert counts["noniid_lr"] == 6 * 6 and counts["mask_aggregation"] == (5 * 3 + 3) * 3  # 5 rules, 3 levels
    assert counts["sparse_centralized_lr"] == 2 * 5 and counts["sparse_centralized"] == 2 * 3
    for name in ("noniid_grid", "sparse_grid", "mask_rules", "fisher_modes", "schedulers", "fedavg_iid", "head_control"):
        assert len({r.cfg.seed for r in loaded[name].runs}) == 3, name
    for name in ("sparse_grid", "mask_rules", "mask_scope", "mask_aggregation", "sparse_centralized"):  # same frozen head
        controls = [r.cfg for r in loaded[name].runs if r.cfg.optimizer == "sgdm"]
        assert controls and all(c.head == "logistic" and c.freeze_head for c in controls), name
        assert loaded[name].control == {"optimizer": "sgdm"}
    baselines = [r.cfg for n in ("centralized_search", "schedulers", "fedavg_iid", "noniid_grid", "remedies_tuning",
                                 "heterogeneity_remedies") for r in loaded[n].runs]
    assert all((c.head, c.freeze_head) == ("logistic", False) for c in baselines)  # one protocol for the baselines
    assert min(r.cfg.lr for r in loaded["centralized_search"].runs) == 0.0001
    # every tuning manifest tunes at the horizon of the studies that take its values
    assert {r.cfg.num_rounds for n in ("fedavg_lr", "sparse_lr", "remedies_tuning", "noniid_lr", "privacy_tuning",
                                       "robustness_tuning") for r in loaded[n].runs} == {200}
    # privacy and robustness: each arm (dense, sparse; each rule) at its own values, the same frozen head for all
    assert counts["privacy_tuning"] == 2 * 2 * 3 * 4 + 2 * 2 * 3 and counts["privacy"] == (2 * 2 * 4 + 2 * 2) * 3
    assert counts["robustness_tuning"] == 5 * 2 * 3 and counts["robustness"] == 5 * 2 * (1 + 3) * 3
    assert loaded["privacy"].control == {"dp": "none"} and loaded["robustness"].control == {"aggregation": "fedavg"}
    threats = [r.cfg for n in ("privacy_tuning", "privacy", "robustness_tuning", "robustness") for r in loaded[n].runs]
    assert all((c.head, c.freeze_head) == ("logistic", True) for c in threats)
    assert {c.attack_fraction for c in threats if c.attack != "none"} == {0.2}
    assert {r.cfg.epochs for n in ("sparse_centralized_lr", "sparse_centralized") for r in loaded[n].runs} == {10}


def _finish(results, manifest, val_and_test):
    """Hand-written finished results of every run of `manifest` (val, test accuracy by run config)."""
    (results / manifest.name).mkdir(parents=True, exist_ok=True)
    (results / manifest.name / "manifest.yaml").write_text(manifest.path.read_text())
    for run in manifest.runs:
        path = Path(run.cfg.run_dir)
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(run.cfg.to_dict()))
        val, test = val_and_test(run.cfg)
        rows = [{"round": 0, "val_accuracy": 0.01, "test_accuracy": 0.01, "test_loss": 4.6},
                {"round": 1, "val_accuracy": val, "test_accuracy": test, "test_loss": 1.0}]
        (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "DONE").write_text("")


def test_tuned_from_takes_the_best_validation_value_per_matched_key_and_never_the_test(tmp_path):
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
base: {head: ridge}
grid: {optimizer: [sgdm, sparse-sgdm], lr: [0.001, 0.01, 0.1]}
seeds: [1, 2]
""", "tune.yaml"), results)
    text = "name: study\nkind: federated\nbase: {head: ridge}\ntuned-from: {manifest: tune, keys: [lr], " \
           "match: [optimizer]}\ngrid: {optimizer: [sgdm, sparse-sgdm], partition: [iid]}\n"
    with pytest.raises(ManifestError, match=r"has not been run under .*; run `python -m experiments run "
                                            r"experiments/manifests/tune.yaml` first, or set lr in base"):
        load_manifest(_write(tmp_path, text, "study.yaml"), results)
    best_val = {"sgdm": 0.001, "sparse-sgdm": 0.01}  # validation picks these; test would pick 0.1 for both

    _finish(results, tune, lambda c: (0.9 if c.lr == best_val[c.optimizer] else 0.5, 0.99 if c.lr == 0.1 else 0.6))
    (Path(tune.runs[0].cfg.run_dir) / "DONE").unlink()
    with pytest.raises(ManifestError, match=r"has not finished \(11 of 12 runs done\)"):
        load_manifest(_write(tmp_path, text, "study.yaml"), results)
    (Path(tune.runs[0].cfg.run_dir) / "DIVERGED").write_text("train_loss is nan at round 1")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)  # a diverged run is finished...
    assert {r.cfg.optimizer: r.cfg.lr for r in study.runs} == {**best_val, "sgdm": 0.01}  # ...and loses
    (Path(tune.runs[0].cfg.run_dir) / "DIVERGED").unlink()
    (Path(tune.runs[0].cfg.run_dir) / "DONE").write_text("")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)
    assert {r.cfg.optimizer: r.cfg.lr for r in study.runs} == best_val
    assert load_manifest(_write(tmp_path, text, "study.yaml"), results, resolve_tuned=False).runs[0].cfg.lr == 0.01


def test_tuned_from_entries_tune_each_remedy_its_own_key_and_a_tuned_value_asks_for_one(tmp_path):
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
grid:
  - {server-optimizer: [fedavgm], server-lr: [0.1, 1.0]}
  - {server-optimizer: [fedavg], prox-mu: [0.01, 0.1]}
seeds: [1]
""", "tune.yaml"), results)
    best = {0.1, 0.01}  # server lr 0.1 and mu 0.01 win on validation; test would pick the others
    _finish(results, tune, lambda c: (0.9, 0.5) if {c.server_lr, c.prox_mu} & best else (0.5, 0.9))
    entries = ("  - {manifest: tune, keys: [server-lr], match: [server-optimizer], for: {server-optimizer: [fedavgm]}}\n"
               "  - {manifest: tune, keys: [prox-mu], match: [server-optimizer], for: {prox-mu: [tuned]}}\n")
    text = ("name: study\nkind: federated\ntuned-from:\n" + entries + "grid:\n"
            "  - {server-optimizer: [fedavg], prox-mu: [0.0, tuned]}\n  - {server-optimizer: [fedavgm]}\n")
    study = load_manifest(_write(tmp_path, text), results)
    runs = {(r.cfg.server_optimizer, r.cfg.prox_mu > 0): r.cfg for r in study.runs}
    assert runs[("fedavg", False)].prox_mu == 0.0 and runs[("fedavg", False)].server_lr == 1.0  # the untouched baseline
    assert runs[("fedavg", True)].prox_mu == 0.01  # FedProx at its validation-best mu
    assert runs[("fedavgm", False)].server_lr == 0.1 and runs[("fedavgm", False)].prox_mu == 0.0
    assert len(load_manifest(_write(tmp_path, text), results, resolve_tuned=False).runs) == 3  # kept apart
    without = text.replace(entries.splitlines()[1] + "\n", "")
    with pytest.raises(ManifestError, match=r"^manifest m.yaml: prox-mu: tuned asks tuned-from for prox-mu, but no "
                                            r"tuned-from entry gives it to this run; add an entry with keys: \[prox-mu\]"):
        load_manifest(_write(tmp_path, without), results)


def test_an_integer_key_tuned_where_other_runs_leave_it_empty_stays_an_integer(tmp_path):
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
grid:
  - {head: [train], head-rounds: [2, 3]}
  - {head: [logistic]}
seeds: [1]
""", "tune.yaml"), results)
    _finish(results, tune, lambda c: (0.9 if c.head == "train" and c.head_rounds == 3 else 0.5, 0.5))
    text = ("name: study\nkind: federated\ntuned-from: {manifest: tune, keys: [head-rounds], match: [head], "
            "for: {head: [train]}}\ngrid: {head: [train, logistic]}\n")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)  # the column has gaps: 3.0 in pandas
    assert {r.cfg.head: r.cfg.head_rounds for r in study.runs}["train"] == 3


def test_a_tuned_key_that_does_not_apply_to_the_best_run_leaves_the_runs_own_value(tmp_path):
    """privacy_tuning's arm without DP has no dp-clipping-norm: its control takes its lr and keeps its own C (a NaN
    was once taken for one, and is now refused as a value)."""
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
grid:
  - {dp: [server-fixed], dp-clipping-norm: [0.1, 1.0], lr: [0.01, 0.1]}
  - {dp: [none], lr: [0.01, 0.1]}
seeds: [1]
""", "tune.yaml"), results)
    _finish(results, tune, lambda c: (0.9 if c.lr == 0.1 and c.dp_clipping_norm in (0.1, 1.0) else 0.5, 0.5))
    text = ("name: study\nkind: federated\ntuned-from: {manifest: tune, keys: [lr, dp-clipping-norm], match: [dp]}\n"
            "grid: {dp: [server-fixed, none]}\n")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)
    assert {r.cfg.dp: (r.cfg.lr, r.cfg.dp_clipping_norm) for r in study.runs} == {"server-fixed": (0.1, 0.1),
                                                                                  "none": (0.1, 1.0)}


def test_tuned_from_gives_each_rule_its_own_lr_and_the_dense_control_its_own(tmp_path):
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
base: {head: logistic}
grid:
  - {optimizer: [sparse-sgdm], mask-rule: [least-sensitive, random], lr: [0.01, 0.1]}
  - {optimizer: [sgdm], lr: [0.001, 0.01]}
seeds: [1]
""", "tune.yaml"), results)
    best = {("sparse-sgdm", "least-sensitive"): 0.1, ("sparse-sgdm", "random"): 0.01, ("sgdm", None): 0.001}
    _finish(results, tune, lambda c: (0.9 if c.lr == best[c.optimizer, c.mask_rule if c.optimizer != "sgdm" else None]
                                      else 0.5, 0.5))
    text = ("name: study\nkind: federated\nbase: {head: logistic}\ntuned-from: {manifest: tune, keys: [lr], "
            "match: [optimizer, mask-rule]}\ngrid:\n  - {optimizer: [sparse-sgdm], mask-rule: [least-sensitive, random]}\n"
            "  - {optimizer: [sgdm]}\n")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)
    # mask-rule does not apply to the dense control: it takes the dense tuning runs' best
    assert {(r.cfg.optimizer, r.cfg.mask_rule if r.cfg.optimizer != "sgdm" else None): r.cfg.lr
            for r in study.runs} == best


@pytest.mark.parametrize("text, words", [
    ("name: x\nkind: federated\ngrid: {classes-per-client: [1, 101]}\n", ["m.yaml", "classes-per-client=101", "<= 100"]),
    ("name: x\nkind: federated\ngrid: {local-steps: [0]}\n", ["local-steps=0", ">= 1"]),
    ("name: x\nkind: federated\ngrid: {sparsity: [1.0]}\n", ["sparsity=1.0", "< 1.0"]),
    ("name: x\nkind: federated\ngrid: {sparsity: 0.9}\n", ["grid axis 'sparsity' must be a non-empty list", "sparsity: [0.9]"]),
    ("name: x\nkind: federated\nbase: {lrr: 0.1}\n", ["unknown run-config key 'lrr'", "did you mean 'lr'"]),
    ("name: x\nkind: federated\nbase: {epochs: ten}\n", ["epochs='ten'", "must be an int"]),
    ("name: x\nkind: distributed\n", ["kind='distributed'", "centralized, federated"]),
    ("name: x\nkind: federated\ngrids: {}\n", ["unknown key 'grids'"]),
])
def test_a_bad_manifest_is_one_sentence_naming_the_manifest_and_key(tmp_path, text, words):
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, text))
    message = str(err.value)
    assert message.startswith("manifest m.yaml: ") and "\n" not in message
    for word in words:
        assert word in message


def test_tuned_from_matches_an_integer_key_that_reads_back_as_float(tmp_path):
    """noniid_lr's classes-per-client column has gaps (its Dirichlet rows), so Nc=5 reads back as 5.0; a study
    at Nc=5 must still find its level's lr (the miniature's remedies_tuning did not)."""
    results = tmp_path / "results"
    tune = load_manifest(_write(tmp_path, """
name: tune
kind: federated
grid:
  - {partition: [noniid], classes-per-client: [1, 5], lr: [0.001, 0.01]}
  - {partition: [dirichlet], lr: [0.001, 0.01]}
seeds: [1]
""", "tune.yaml"), results)
    best = {1: 0.001, 5: 0.01, None: 0.001}
    _finish(results, tune, lambda c: (0.9 if c.lr == best[c.classes_per_client if c.partition == "noniid" else None]
                                      else 0.5, 0.5))
    text = ("name: study\nkind: federated\ntuned-from: {manifest: tune, keys: [lr], match: [partition, "
            "classes-per-client]}\ngrid:\n  - {partition: [noniid], classes-per-client: [1, 5]}\n"
            "  - {partition: [dirichlet]}\n")
    study = load_manifest(_write(tmp_path, text, "study.yaml"), results)
    assert {(r.cfg.classes_per_client if r.cfg.partition == "noniid" else None): r.cfg.lr for r in study.runs} == best


def test_a_missing_manifest_is_not_found_with_the_list_and_bad_yaml_names_the_file_and_line(tmp_path):
    (tmp_path / "noniid_grid.yaml").write_text("name: noniid_grid\nkind: federated\n")
    (tmp_path / "broken.yaml").write_text("name: broken\ngrid: {lr: [0.1\n")
    with pytest.raises(ManifestError, match=r"noniid_gird\.yaml not found; the manifests in .* are broken, "
                                            r"noniid_grid\."):
        load_manifest(tmp_path / "noniid_gird.yaml")
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "broken.yaml")
    assert "broken.yaml is not valid YAML" in str(err.value) and 'in "' + str(tmp_path / "broken.yaml") in str(err.value)
    assert "line 2" in str(err.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_manifest_dry_runs_on_a_fresh_clone_naming_the_tuning_still_to_run(path, tmp_path):
    import yaml
    from rich.console import Console

    from experiments.display import print_plan

    pending = []
    manifest = load_manifest(path, tmp_path, pending=pending)  # tmp_path: no tuning manifest has run
    assert manifest.runs
    tuned_from = yaml.safe_load(path.read_text()).get("tuned-from")
    assert bool(pending) == bool(tuned_from)
    if not tuned_from:
        return
    with pytest.raises(ManifestError, match="which has not been run under"):  # a real run still refuses
        load_manifest(path, tmp_path)
    console = Console(record=True, width=300)
    print_plan(manifest, list(manifest.runs), console, pending)
    text = console.export_text()
    assert f"{path.stem}: {len(manifest.runs)} runs" in text
    first = pending[0]
    assert (f"pending: {', '.join(first.keys)} from the best of manifest {first.manifest}, not tuned yet; run "
            f"`python -m experiments run experiments/manifests/{first.manifest}.yaml` first") in text


@pytest.mark.parametrize("text", ["name: ..\nkind: federated\n", "name: ../elsewhere\nkind: federated\n",
                                  "name: .hidden\nkind: federated\n", "name: /abs\nkind: federated\n",
                                  "name: ok\nkind: federated\ntuned-from: {manifest: '..', keys: [lr]}\n"])
def test_a_manifest_or_tuning_name_that_would_leave_the_results_folder_is_one_sentence(tmp_path, text):
    with pytest.raises(ManifestError, match=r"must be a folder name of letters, digits"):
        load_manifest(_write(tmp_path, text), tmp_path / "results")
    assert not (tmp_path / "results").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]
