"""Manifests: a YAML grid of run configs (name, kind, base, grid, seeds), expanded and checked up front.

    name: noniid_grid            # results go to results/<name>/<run-id>
    kind: federated              # centralized | federated
    base: {model: vit-small-dino, num-rounds: 500}
    grid:                        # one mapping of axes, or a list of them (their union); a grid may
      - {partition: [noniid], classes-per-client: [1, 5, 10, 50], local-steps: [4, 8, 16]}
      - {partition: [iid], local-steps: [4, 8, 16]}   # also set its own kind: [centralized]
    seeds: [42]
    rounds-scaling: true         # optional: num-rounds counts rounds at J=4
    control: {partition: iid}    # optional: the control arm; the report pairs every other arm with it by seed
    tuned-from: {manifest: fedavg_lr, keys: [lr]}   # optional: these keys from that manifest's best
                                 # configuration by validation accuracy (it must have finished); base < tuned < grid;
                                 # with match: [optimizer], the best among its runs of the same optimizer;
                                 # with for: {server-optimizer: [fedadam]}, only for the runs with those values.
                                 # A list of such entries tunes different keys from different manifests, and a
                                 # grid value `tuned` (e.g. prox-mu: [tuned]) asks for that key's tuned value.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.selection import edge_winners, equals, select_best
from experiments.tables import load_results, over_seeds, summarize
from fed_app.applicability import key_applies
from fed_app.config import ConfigError, RunConfig
from fed_app.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("centralized", "federated")
TOP_KEYS = {"name", "kind", "base", "grid", "seeds", "rounds-scaling", "description", "tuned-from", "control"}
TUNED = "tuned"  # a base or grid value that tuned-from fills in


class ManifestError(UserError, ValueError):
    """A manifest that cannot run; one sentence naming the manifest, the key and the fix."""


class TuningPending(ManifestError):
    """tuned-from names a tuning manifest that has not run (or finished) yet: its keys are still to be tuned."""

    def __init__(self, message: str, manifest: str, keys: list[str], command: str):
        super().__init__(message)
        self.manifest, self.keys, self.command = manifest, keys, command


@dataclass(frozen=True)
class Run:
    kind: str
    cfg: RunConfig

    @property
    def run_id(self) -> str:
        return f"{self.kind}-{self.cfg.run_id()}"

    def label(self, axes: list[str]) -> str:
        """The grid values that tell this run apart, e.g. 'classes-per-client=5 local-steps=8 seed=42'."""
        values = self.cfg.to_run_config()
        return " ".join(f"{k}={values[k]}" for k in axes if k in values) or self.run_id


@dataclass(frozen=True)
class Manifest:
    name: str
    path: Path
    runs: tuple[Run, ...]
    axes: tuple[str, ...]  # the run-config keys the grid varies (kebab-case), seed last
    control: dict[str, Any] = dataclasses.field(default_factory=dict)  # the control arm's values, e.g. {optimizer: sgdm}


def load_manifest(path: str | Path, results: str | Path = "results", resolve_tuned: bool = True,
                  pending: list[TuningPending] | None = None) -> Manifest:
    """Read, check and expand a manifest; every run gets run-dir results/<name>/<run-id>. `tuned-from` values
    are read from the tuning manifest's results (resolve_tuned=False keeps the base values: for wall-time
    projections and reports, which do not depend on them). With a `pending` list, a tuning manifest that has not
    run yet is noted there, its keys kept at their base values, instead of refused (--dry-run)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        listing = f"; the manifests in {path.parent} are {', '.join(shipped)}" if shipped else ""
        raise ManifestError(f"manifest {path} not found{listing}.")
    try:
        with path.open() as stream:  # read from the file, so that a YAML error names it with line and column
            raw = yaml.safe_load(stream)
    except yaml.YAMLError as err:
        raise ManifestError(f"manifest {path} is not valid YAML: {err}; fix the file there.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path} cannot be read ({err}).") from err
    where = f"manifest {path.name}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: the top level must be a mapping with name, kind, base, grid and seeds.")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key '{sorted(unknown)[0]}'; the keys are {', '.join(sorted(TOP_KEYS))}.")
    name, kind = raw.get("name"), raw.get("kind")
    _check_name(where, "'name'", name)
    if kind not in KINDS and kind is not None:
        raise ManifestError(f"{where}: kind={kind!r} is not one of {', '.join(KINDS)}; pick one.")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ManifestError(f"{where}: 'base' must be a mapping of run-config keys to values.")
    seeds = raw.get("seeds", [base.get("seed", RunConfig().seed)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ManifestError(f"{where}: 'seeds' must be a non-empty list of integers, e.g. seeds: [42, 43].")
    control = raw.get("control") or {}
    if not isinstance(control, dict) or any(isinstance(v, (list, dict)) for v in control.values()):
        raise ManifestError(f"{where}: 'control' must map grid keys to the control arm's value, e.g. "
                            f"control: {{optimizer: sgdm}}.")
    if "rounds-scaling" in raw:
        base = {**base, "rounds-scaling": raw["rounds-scaling"]}
    results = Path(results)
    tuned = (tuned_picker(where, raw["tuned-from"], results, pending) if "tuned-from" in raw and resolve_tuned
             else None)
    untuned = {k for p in pending or () for k in p.keys}  # keys whose tuning has not run
    runs: dict[str, Run] = {}  # by run id: overlapping grids name the same run once
    axes: list[str] = []
    for point in _grid_points(where, raw.get("grid") or {}):
        point_kind = point.pop("kind", kind)
        if point_kind not in KINDS:
            raise ManifestError(f"{where}: kind={point_kind!r} is not one of {', '.join(KINDS)}; set it at the "
                                f"top level or in the grid.")
        axes += [k for k in point if k not in axes]
        found = tuned({**base, **point}, point_kind) if tuned else {}
        values = _fill_tuned(where, {**base, **found, **point}, found, resolve_tuned, untuned)
        for seed in seeds:
            try:
                cfg = RunConfig.from_run_config({**values, "seed": seed})
            except ConfigError as err:
                raise ManifestError(f"{where}: {err}") from None
            run = Run(point_kind, cfg)
            # unresolved `tuned` values stand at their defaults: such runs stay apart, as they will be when tuned
            apart = (not resolve_tuned or untuned) and TUNED in point.values()
            key = f"{run.run_id}{sorted(point.items())}" if apart else run.run_id
            runs[key] = Run(point_kind, cfg.replace(run_dir=str((results / name / run.run_id).resolve())))
    if len(seeds) > 1:
        axes.append("seed")
    unknown = [k for k in control if k not in axes]
    if unknown:
        raise ManifestError(f"{where}: control key '{unknown[0]}' is not a grid axis; name a key the grid varies.")
    return Manifest(name, path, tuple(runs.values()), tuple(axes), control)


def _grid_points(where: str, grid: Any) -> list[dict[str, Any]]:
    grids = grid if isinstance(grid, list) else [grid]
    points = []
    for g in grids:
        if not isinstance(g, dict):
            raise ManifestError(f"{where}: each grid must be a mapping of run-config keys to lists of values.")
        for key, values in g.items():
            if key == "kind" and isinstance(values, str):
                values = g[key] = [values]
            if not isinstance(values, list) or not values:
                raise ManifestError(
                    f"{where}: grid axis '{key}' must be a non-empty list, e.g. {key}: [{values!r}].")
        keys = list(g)
        points += [dict(zip(keys, combo)) for combo in itertools.product(*(g[k] for k in keys))]
    return points


def _fill_tuned(where: str, values: dict[str, Any], found: dict[str, Any], resolve: bool,
                untuned: set[str] = frozenset()) -> dict[str, Any]:
    """`values` with each `tuned` value replaced by the tuned one (by the key's default when not resolving, or
    while its tuning has not run)."""
    defaults = RunConfig().to_run_config()
    for key, value in values.items():
        if value != TUNED:
            continue
        if resolve and key not in found and key not in untuned:
            raise ManifestError(f"{where}: {key}: tuned asks tuned-from for {key}, but no tuned-from entry gives it "
                                f"to this run; add an entry with keys: [{key}] (and a for: that includes the run).")
        values[key] = found[key] if key in found else defaults.get(key)
    return values


def tuned_picker(where: str, spec: Any, results: Path,
                 pending: list[TuningPending] | None = None) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """tuned-from, one entry or a list: for a run's values (before tuning) and kind, the tuned {key: value} of
    every entry whose `for` includes the run, later entries winning. An entry whose tuning has not run is
    refused, or with a `pending` list noted there and left out."""
    entries = spec if isinstance(spec, list) else [spec]
    pickers = []
    for entry in entries:
        try:
            picker = tuned_values(where, entry, results)
        except TuningPending as err:
            if pending is None:
                raise
            pending.append(err)
            continue
        pickers.append((entry.get("for", {}) if isinstance(entry, dict) else {}, picker))
    defaults = RunConfig().to_run_config()

    def pick(values: dict[str, Any], kind: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for only, picker in pickers:
            if all(str(values.get(k, defaults.get(k))) in map(str, allowed) for k, allowed in only.items()):
                found.update(picker(values, kind))
        return found

    return pick


def tuned_values(where: str, spec: Any, results: Path) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """For a run's values and kind, {key: value} of the best configuration of a finished tuning manifest: the
    highest mean validation accuracy over seeds at each run's final evaluation (the report's 'final' rule), never
    the test accuracy; with `match`, among the tuning runs that share the run's values of those keys (a key that
    does not apply to the run, e.g. mask-rule to a dense control, matches the tuning runs it does not apply to)."""
    fields = {"manifest", "keys", "match", "for"}
    if not (isinstance(spec, dict) and {"manifest", "keys"} <= set(spec) <= fields
            and isinstance(spec["manifest"], str) and isinstance(spec["keys"], list) and spec["keys"]
            and isinstance(spec.get("match", []), list) and isinstance(spec.get("for", {}), dict)
            and all(isinstance(v, list) for v in spec.get("for", {}).values())):
        raise ManifestError(f"{where}: 'tuned-from' must be a mapping like {{manifest: fedavg_lr, keys: [lr]}} "
                            f"(optionally match: [optimizer], for: {{optimizer: [sgdm]}}), or a list of them.")
    name, keys, match = spec["manifest"], spec["keys"], spec.get("match", [])
    _check_name(where, "tuned-from's manifest", name)
    saved = results / name / "manifest.yaml"
    command = f"run `python -m experiments run experiments/manifests/{name}.yaml` first, or set {keys[0]} in base"
    if not saved.exists():
        raise TuningPending(f"{where}: tuned-from takes {', '.join(keys)} from the results of manifest {name}, "
                            f"which has not been run under {results}; {command}.", name, keys, command)
    tuning = load_manifest(saved, results)  # its own tuned values too: they are in its run ids
    done = sum((Path(r.cfg.run_dir) / "DONE").exists() or (Path(r.cfg.run_dir) / "DIVERGED").exists()
               for r in tuning.runs)  # a diverged run is finished: it loses the selection
    if done < len(tuning.runs):
        raise TuningPending(f"{where}: tuned-from takes {', '.join(keys)} from manifest {name}, which has not "
                            f"finished ({done} of {len(tuning.runs)} runs done); {command}.", name, keys, command)
    axes = [a.replace("-", "_") for a in tuning.axes]
    table = over_seeds(summarize(load_results(results / name), axes, "final"), axes)
    absent = [k for k in keys + match if k.replace("-", "_") not in table]
    if absent:
        raise ManifestError(f"{where}: tuned-from key '{absent[0]}' is not a grid axis of manifest {name}; "
                            f"name keys that {name} varies.")
    defaults = RunConfig().to_run_config()

    def pick(values: dict[str, Any], kind: str) -> dict[str, Any]:
        rows = table
        snake = {k.replace("-", "_"): v for k, v in {**defaults, **values}.items()}
        for key in match:
            column = rows[key.replace("-", "_")]
            if key_applies(key.replace("-", "_"), kind, snake):
                rows = rows[equals(column, values.get(key, defaults[key]))]
            else:
                rows = rows[column.isna()]
        best = select_best(rows)
        if best is None:
            wanted = ", ".join(f"{k}={values.get(k, defaults[k])}" for k in match)
            raise ManifestError(f"{where}: manifest {name} has no finished run with {wanted} to take "
                                f"{', '.join(keys)} from; add those values to its grid.")
        for note in edge_winners(rows, best, [k.replace("-", "_") for k in keys]):
            if (name, note) not in _FLAGGED:  # once per command, not once per run that takes the value
                _FLAGGED.add((name, note))
                log.warning("%s: the best of manifest %s is at the edge of its grid: %s to its grid and rerun it.",
                            where, name, note)
        # a key that does not apply to the best configuration (dp-clipping-norm of the arm without DP) is empty
        # there: the run keeps its own value (a NaN in its config was once taken for one)
        return {k: _plain(best[k.replace("-", "_")], k) for k in keys if best[k.replace("-", "_")] == best[k.replace("-", "_")]}  # NaN != NaN

    return pick


_FLAGGED: set[tuple[str, str]] = set()
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one folder inside the results folder: no '..', no '/'


def _check_name(where: str, what: str, name: Any) -> None:
    """A manifest's name is the folder of its runs under the results folder: it must stay one folder inside it."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ManifestError(f"{where}: {what} must be a folder name of letters, digits, '_', '-' and '.' (not "
                            f"first) such as noniid_grid, not {name!r}.")


def _plain(value: Any, key: str) -> Any:
    """A value read back from a results table as the Python value a YAML manifest would have given for `key`: a
    numpy scalar unwrapped, and an integer key's 3.0 (a column with gaps is float) as 3."""
    value = value.item() if hasattr(value, "item") else value
    kind = RunConfig.__dataclass_fields__[key.replace("-", "_")].type
    return int(value) if kind in ("int", int) and isinstance(value, float) and value.is_integer() else value
