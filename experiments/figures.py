"""Report figures, chosen by which grid axes vary: curves, accuracy per axis, Nc x J heatmap, bytes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.methods import level_and_method_order  # noqa: E402

# config.json keys that are not a setting to tell configurations apart by (claim_token, session: runs made before
# the commands' plumbing left RunConfig hold them)
NOT_A_SETTING = ("seed", "run_dir", "claim_token", "session")


def _label(row: pd.Series, axes: list[str]) -> str:
    """'partition=noniid, classes-per-client=5' from the axes that apply to the row (empty ones left out)."""
    return ", ".join(f"{a.replace('_', '-')}={row[a]}" for a in axes if a in row and pd.notna(row[a]))


def _distinct(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    """The axes whose values differ within `frame`: the only ones worth a legend entry."""
    return [a for a in axes if a in frame and frame[a].astype(str).nunique() > 1]


def run_colours(run_ids) -> dict[str, tuple]:
    """One colour per run, the same in every figure of a report: by the run's place among all its runs."""
    palette = plt.get_cmap("tab10" if len(set(run_ids)) <= 10 else "tab20").colors
    return {run: palette[i % len(palette)] for i, run in enumerate(sorted(set(run_ids)))}


def _save(fig, path: Path) -> Path:
    """The figure at 110 dpi, its canvas grown to hold every label (nothing clipped, no layout warning)."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _save_with_legend(fig, ax, path: Path, ncol: int) -> Path:
    """`_save`, with `ax`'s legend under the figure however many entries it has."""
    fig.tight_layout()
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=7,
                   frameon=False)
    return _save(fig, path)


def curves(df: pd.DataFrame, axes: list[str], kind: str, out: Path) -> Path:
    """Loss and accuracy against epoch (centralized) or round (federated), one line per run in its colour; test
    curves where runs were tested at least 3 times, validation curves otherwise."""
    colours = run_colours(df["run_id"])
    df = df[df["kind"] == kind]
    tested = df.dropna(subset=["test_accuracy"]).groupby("run_id").size() if "test_accuracy" in df else None
    split = "test" if tested is not None and len(tested) and tested.min() >= 3 else "val"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = _distinct(df.groupby("run_id").first(), [a for a in axes if a != "kind"] + ["seed"])
    for run_id, g in df.dropna(subset=[f"{split}_accuracy"]).groupby("run_id"):
        g = g.sort_values("step")
        label = _label(g.iloc[0], shown)
        if f"{split}_loss" in g:
            ax_loss.plot(g["step"], g[f"{split}_loss"], marker=".", label=label, color=colours[run_id])
        ax_acc.plot(g["step"], 100 * g[f"{split}_accuracy"], marker=".", label=label, color=colours[run_id])
    for ax, name in ((ax_loss, f"{split} loss"), (ax_acc, f"{split} accuracy (%)")):
        ax.set_xlabel("epoch" if kind == "centralized" else "round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{kind}: {'test' if split == 'test' else 'validation'} loss and accuracy per run")
    return _save_with_legend(fig, ax_acc, out / f"curves_{kind}.png", ncol=2)


def _numeric(values: pd.Series) -> pd.Series | None:
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().all() and values.nunique() > 2 else None


def per_axis(summary: pd.DataFrame, axis: str, axes: list[str], out: Path) -> Path | None:
    """Test accuracy (at the report's checkpoint rule) against one axis, over the runs the axis applies to; one
    line (or bar group) per value of the other axes that vary among them, and only where that sub-grid takes two
    or more values of the axis: runs that differ in other ways too are not compared here. Runs of the same kind
    that the axis does not apply to (e.g. the dense control of a sparsity grid) are dashed horizontal lines. A
    numeric axis spanning a factor of ten or more (a learning rate) is drawn on a log scale. Error bars (the std
    over seeds) only where there are two seeds or more; the y label says n. None when no sub-grid varies the
    axis."""
    treated = summary[summary[axis].notna()]
    if treated[axis].astype(str).nunique() < 2:
        return None
    controls = summary[summary[axis].isna() & summary["kind"].isin(treated["kind"].unique())]
    axes = [a for a in axes if a != "seed"]  # seeds are replicates: averaged over, never a line of their own
    others = _distinct(treated, ["kind"] + [a for a in axes if a != axis])
    groups = list(treated.groupby(others, dropna=False)) if others else [((), treated)]
    groups = [(key, g) for key, g in groups if g[axis].astype(str).nunique() >= 2]  # a comparison along `axis`
    if not groups:
        return None
    treated = pd.concat([g for _, g in groups])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = _numeric(treated[axis])
    seeds = treated.groupby([*others, axis], dropna=False).size() if others else treated.groupby(axis).size()
    width = 0.8 / max(1, len(groups))
    categories = sorted(treated[axis].astype(str).unique())
    for i, (key, g) in enumerate(groups):
        g = g.assign(x=xs if xs is not None else g[axis].astype(str))
        stats = g.groupby("x")["test_accuracy"].agg(["mean", "std", "count"]).reset_index()
        label = _label(pd.Series(dict(zip(others, key if isinstance(key, tuple) else (key,)))).dropna(), others) or None
        yerr = 100 * stats["std"].fillna(0) if stats["count"].max() > 1 else None  # no spread from one seed
        if xs is not None:
            stats = stats.sort_values("x")
            ax.errorbar(stats["x"], 100 * stats["mean"], yerr=yerr if yerr is None else yerr[stats.index],
                        marker="o", capsize=3, label=label)
        else:
            pos = [categories.index(v) + i * width for v in stats["x"]]
            ax.bar(pos, 100 * stats["mean"], width=width, yerr=yerr, capsize=3, label=label)
    shown = _distinct(controls, [a for a in axes if a != axis])
    for key, g in (controls.groupby(shown, dropna=False) if shown else [((), controls)]) if len(controls) else []:
        values = g.iloc[0]
        names = [a for a in axes if a != axis and pd.notna(values.get(a))
                 and (a in shown or str(values[a]) not in set(treated[a].astype(str)))]
        ax.axhline(100 * g["test_accuracy"].mean(), linestyle="--", color="grey",
                   label="control: " + (_label(values, names) or "runs without " + axis.replace("_", "-")))
    if xs is None:
        ax.set_xticks([c + width * (len(groups) - 1) / 2 for c in range(len(categories))], categories, rotation=20)
    if xs is not None and (xs > 0).all() and xs.max() / xs.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(axis.replace("_", "-"))
    n = sorted(set(seeds.tolist()))
    ax.set_ylabel("test accuracy (%), one seed" if n == [1] else
                  f"test accuracy (%), mean ± std, n={'-'.join(map(str, (n[0], n[-1]) if len(n) > 1 else n))} seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Test accuracy by {axis.replace('_', '-')}")
    return _save_with_legend(fig, ax, out / f"accuracy_by_{axis}.png", ncol=1)


def heterogeneity_heatmap(summary: pd.DataFrame, out: Path) -> Path:
    """Final test accuracy for each shard setting (iid, Nc) and number of local steps J."""
    s = summary.copy()
    s = s[s["local_steps"].notna() & s["partition"].notna()]
    nc = pd.to_numeric(s["classes_per_client"], errors="coerce").fillna(0).astype(int)
    s["shards"] = np.where(s["partition"] == "iid", "iid", "Nc=" + nc.astype(str))
    order = sorted(s["shards"].unique(), key=lambda v: (v == "iid", int(v[3:]) if v != "iid" else 0))
    grid = s.pivot_table(index="shards", columns="local_steps", values="test_accuracy").reindex(order)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    image = ax.imshow(100 * grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [f"J={j}" for j in grid.columns])
    ax.set_yticks(range(len(grid.index)), grid.index)
    for (i, j), v in np.ndenumerate(grid.values):
        ax.text(j, i, "-" if np.isnan(v) else f"{100 * v:.1f}", ha="center", va="center", color="w")
    fig.colorbar(image, label="final test accuracy (%)")
    ax.set_title("Test accuracy: heterogeneity x local steps")
    return _save(fig, out / "heatmap_shards_by_local_steps.png")


def bytes_per_round(summary: pd.DataFrame, axes: list[str], out: Path) -> Path:
    """Bytes clients send back per round, per configuration (dense vs sparse), labelled by what tells the
    configurations apart (wrapped, never cut)."""
    s = summary.dropna(subset=["bytes_per_round"])
    shown = _distinct(s, [a for a in axes if a != "seed"])
    labels = [textwrap.fill(_label(r, shown) or r["run_id"], 45) for _, r in s.iterrows()]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(9, 0.3 * lines + 0.3 * len(s) + 1.5))
    colours = run_colours(summary["run_id"])  # each bar in its run's colour, as in the curves
    ax.barh(range(len(s)), s["bytes_per_round"] / 2**20, color=[colours[r] for r in s["run_id"]])
    ax.set_yticks(range(len(s)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB received by the server per round")
    ax.set_title("Upload per round")
    return _save(fig, out / "bytes_per_round.png")


def make_figures(df: pd.DataFrame, summary: pd.DataFrame, axes: list[str], out: Path) -> list[Path]:
    made = [curves(df, axes, kind, out) for kind in sorted(df["kind"].unique())]
    axes = [a for a in axes if a != "kind"]
    made += [p for p in (per_axis(summary, axis, axes, out) for axis in axes if axis != "seed") if p is not None]
    if {"partition", "local_steps"} <= set(axes) or {"classes_per_client", "local_steps"} <= set(axes):
        made.append(heterogeneity_heatmap(summary, out))
    if summary["bytes_per_round"].notna().any() and len(summary) > 1:
        made.append(bytes_per_round(summary, axes, out))
    return made


def methods_figure(stats: pd.DataFrame, out: Path) -> Path:
    """Grouped bars of experiments.methods.methods_by_level: test accuracy per heterogeneity level (most skewed
    left), one bar per remedy (FedAvg first), mean ± std over seeds."""

    levels, methods = level_and_method_order(stats)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(levels)), 4.5))
    for i, method in enumerate(methods):
        rows = stats[stats["method"] == method]
        pos = [levels.index(lv) + i * width for lv in rows["level"]]
        ax.bar(pos, 100 * rows["mean"], width=width, yerr=100 * rows["std"].fillna(0), capsize=3, label=method)
    ax.set_xticks([c + width * (len(methods) - 1) / 2 for c in range(len(levels))], levels)
    ax.set_xlabel("label skew (most skewed left)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("Test accuracy per method and heterogeneity level")
    return _save(fig, out / "accuracy_by_method_and_heterogeneity.png")


def client_classes(results_dir: Path, out: Path) -> list[Path]:
    """One clients x classes heatmap (images per class held by each client, clients sorted by size) per
    distinct partition among the federated runs (`shards.json`, written at step 0), titled by its settings."""
    import json

    made, seen = [], set()
    for shards in sorted(Path(results_dir).glob("*/shards.json")):
        config = json.loads((shards.parent / "config.json").read_text())
        key = tuple(config.get(k) for k in ("partition", "classes_per_client", "dirichlet_alpha", "num_clients",
                                             "seed", "split_seed", "dataset", "val_size"))
        if key in seen:
            continue
        seen.add(key)
        counts = np.array(json.loads(shards.read_text())["class_counts"])
        counts = counts[np.argsort(-counts.sum(1), kind="stable")]
        setting = {"iid": "iid", "noniid": f"Nc={config['classes_per_client']}",
                   "dirichlet": f"Dirichlet alpha={config.get('dirichlet_alpha')}"}[config["partition"]]
        sizes = counts.sum(1)
        fig, ax = plt.subplots(figsize=(8, 5))
        image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)  # from zero
        fig.colorbar(image, ax=ax, label="images")
        ax.set_xlabel("class")
        ax.set_ylabel("client (largest first)")
        ax.set_title(f"{setting}, seed {config['seed']}: {len(counts)} clients, {sizes.min()}-{sizes.max()} images, "
                     f"{np.mean((counts > 0).sum(1)):.1f} classes each on average", fontsize=9)
        safe = setting.replace(" ", "_").replace("=", "")
        path = out / f"clients_x_classes_{safe}_{len(counts)}clients_seed{config['seed']}.png"
        if path in made:  # the same split drawn for another run: once is enough
            plt.close(fig)
            continue
        made.append(_save(fig, path))
    return made


def _block(name: str) -> str:
    """'blocks.3.attn.qkv.weight' -> 'blocks.3'; 'patch_embed.proj.weight' -> 'patch_embed'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else parts[0]


def block_densities(stats: list[dict]) -> dict[str, float]:
    """mask_stats.json rows (per tensor, then the total) -> trainable fraction per block, in model order."""
    blocks: dict[str, list[int]] = {}
    for row in stats[:-1]:  # the last row is the total
        total = blocks.setdefault(_block(row["name"]), [0, 0])
        total[0] += row["trainable"]
        total[1] += row["numel"]
    return {b: t / n for b, (t, n) in blocks.items()}


def mask_layers(results_dir: Path, out: Path, run_ids=()) -> Path | None:
    """Where each mask puts the trainable weights: density per block of the model (from each sparse run's
    `mask_stats.json`), one line per configuration (its first seed), labelled by what differs between them
    (e.g. mask-aggregation, mask-rule, sparsity)."""
    import json

    from fed_app.applicability import key_applies

    runs = {}
    for stats in sorted(Path(results_dir).glob("*/mask_stats.json")):
        config = json.loads((stats.parent / "config.json").read_text())
        key = json.dumps({k: v for k, v in config.items() if k not in NOT_A_SETTING}, sort_keys=True)
        kind = "centralized" if stats.parent.name.startswith("centralized") else "federated"
        runs.setdefault(key, (config, json.loads(stats.read_text()), kind))
    if not runs:
        return None
    configs = [c for c, _, _ in runs.values()]
    differing = [k for k in configs[0] if k not in NOT_A_SETTING
                 and len({json.dumps(c.get(k)) for c in configs}) > 1]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [Path(c["run_dir"]).name for c in configs]
    colours = run_colours(list(run_ids) or names)  # `run_ids`: the report's drawn runs, coloured as elsewhere
    for i, (config, rows, kind) in enumerate(runs.values()):
        blocks = block_densities(rows)
        label = ", ".join(f"{k.replace('_', '-')}={config[k]}" for k in differing
                          if key_applies(k, kind, config))
        run = Path(config["run_dir"]).name
        # blocks in model order: thin lines guide the eye from block to block, the markers are the data
        ax.plot(list(blocks), [100 * d for d in blocks.values()], marker="os^Dv<>"[i % 7], linewidth=0.6,
                color=colours.get(run, "grey"), label=f"{label} ({run})" if label else run)
    ax.set_ylabel("trainable entries (%)")
    ax.set_xlabel("model block")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("where the masks put the trainable weights, per block")
    return _save(fig, out / "mask_density_per_block.png")
