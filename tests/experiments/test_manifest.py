"""Manifests: expansion counts, stable ids, every shipped manifest valid, one-sentence errors."""

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
    assert len(load_manifest(path).runs) >= 1


def test_the_shipped_studies_have_the_sizes_the_brief_asks_for():
    counts = {p.stem: len(load_manifest(p).runs) for p in SHIPPED}
    assert counts["noniid_grid"] == 15 and counts["schedulers"] == 5 and counts["mask_rules"] == 10
    assert counts["sparse_grid"] == 15


@pytest.mark.parametrize("text, words", [
    ("name: x\nkind: federated\ngrid: {classes-per-client: [1, 101]}\n", ["m.yaml", "classes-per-client=101", "<= 100"]),
    ("name: x\nkind: federated\ngrid: {local-steps: [0]}\n", ["local-steps=0", ">= 1"]),
    ("name: x\nkind: federated\ngrid: {sparsity: [1.0]}\n", ["sparsity=1.0", "< 1.0"]),
    ("name: x\nkind: federated\ngrid: {sparsity: 0.9}\n", ["grid axis 'sparsity' must be a non-empty list", "sparsity: [0.9]"]),
    ("name: x\nkind: federated\nbase: {lrr: 0.1}\n", ["unknown run-config key 'lrr'", "did you mean 'lr'"]),
    ("name: x\nkind: federated\nbase: {epochs: ten}\n", ["epochs='ten'", "must be a int"]),
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
