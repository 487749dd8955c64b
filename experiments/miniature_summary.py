"""The miniature study's summary page: for each manifest, what it selected (and whether at the edge of its grid),
each arm against its control with the paired interval, and what diverged; with the date and the time taken."""

from __future__ import annotations

import datetime
from pathlib import Path

import pandas as pd
import yaml

from experiments.paired import paired_table


def write_summary(results: Path, names: list[str], timings: dict[str, tuple[int, float]], seconds: float,
                  setting: str) -> Path:
    """results/summary.md for these manifests (in the order run), their (runs, seconds), the whole time taken and
    the miniature's `setting` in words; its path."""
    runs = sum(n for n, _ in timings.values())
    lines = [f"# The study in miniature ({datetime.date.today().isoformat()})", "",
             f"{len(names)} manifests, {runs} runs in {seconds / 60:.1f} min, in process on this machine: {setting}. "
             f"The grids, seeds, controls and selection rules are the manifests' own. Numbers on digits say whether the protocol works (every arm learns, the "
             f"selections are inside their grids, the controls pair), not what CIFAR-100 will show.", ""]
    for name in names:
        folder = results / name
        description = " ".join(str(yaml.safe_load((folder / "manifest.yaml").read_text()).get("description", "")).split())
        n, secs = timings.get(name, (0, 0.0))
        lines += [f"## {name}", "", f"{description} ({n} runs, {secs:.0f} s)", ""]
        report = (folder / "report.md").read_text().splitlines() if (folder / "report.md").exists() else []
        lines += [line for line in report if line.startswith(("**Best", "Every configuration ran one seed"))]
        summary = pd.read_csv(folder / "summary.csv") if (folder / "summary.csv").exists() else None
        if summary is not None:
            diverged = summary[summary["diverged"].notna()] if "diverged" in summary else summary[:0]
            learned = summary[summary["diverged"].isna()] if "diverged" in summary else summary
            worse = learned[learned["test_loss"] >= learned["step0_test_loss"]]
            lines += ["", f"Diverged: {len(diverged)} of {len(summary)} runs"
                      + (f" ({', '.join(diverged['run_id'])})" if len(diverged) else "")
                      + f". Ended with a test loss not below their start: {len(worse)}"
                      + (f" ({', '.join(worse['run_id'])})" if len(worse) else "") + "."]
        if (folder / "paired.csv").exists():
            lines += ["", paired_table(pd.read_csv(folder / "paired.csv"))]
        lines += ["", f"Full report: `{name}/report.md`.", ""]
    path = results / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
