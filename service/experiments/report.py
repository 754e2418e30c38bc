"""`rankserve shadow-report`: summarize a shadow sink into a markdown table and a PNG.

One row per (arm, shadow): requests compared, mean / p5 / median of Kendall tau and Spearman,
mean top-10 and top-N overlap, mean NDCG@N, and the mean per-task absolute score difference.
The PNG shows the distributions of tau, of both overlaps and of the per-task score deltas, one
colour per shadow. matplotlib (the train or loadtest extra) is needed for the PNG only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.experiments.sinks import read_jsonl, read_stream

log = logging.getLogger("rankserve.shadow_report")

MEASURES = ("kendall_tau", "spearman", "overlap_at_10", "overlap_at_n", "ndcg_at_n")


@dataclass
class ShadowSummary:
    arm: str
    shadow: str
    primary_models: set[str] = field(default_factory=set)
    shadow_models: set[str] = field(default_factory=set)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    mae: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    requests: int = 0

    @property
    def label(self) -> str:
        return f"{self.arm}/{self.shadow}"


def summarize(records: Iterable[dict[str, Any]]) -> list[ShadowSummary]:
    """Group records by (arm, shadow); None values (undefined measures) are left out."""
    groups: dict[tuple[str, str], ShadowSummary] = {}
    for r in records:
        if "shadow" not in r or "arm" not in r:
            continue
        key = (str(r["arm"]), str(r["shadow"]))
        s = groups.setdefault(key, ShadowSummary(*key))
        s.requests += 1
        s.primary_models.add(str(r.get("primary_model")))
        s.shadow_models.add(str(r.get("shadow_model")))
        for m in MEASURES:
            v = r.get(m)
            if isinstance(v, int | float):
                s.values[m].append(float(v))
        for task, v in (r.get("score_mae") or {}).items():
            if isinstance(v, int | float):
                s.mae[task].append(float(v))
    return [groups[k] for k in sorted(groups)]


def _fmt(values: list[float], how: str) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    v = {"mean": a.mean(), "p5": np.percentile(a, 5), "p50": np.percentile(a, 50)}[how]
    return f"{v:.4f}"


def markdown(summaries: list[ShadowSummary]) -> str:
    tasks = sorted({t for s in summaries for t in s.mae})
    head = ["arm", "shadow", "primary", "shadow model", "requests", "tau mean", "tau p5", "tau p50", "spearman mean",
            "overlap@10", "overlap@N", "NDCG@N", *(f"MAE {t}" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s.arm, s.shadow, ", ".join(sorted(s.primary_models)), ", ".join(sorted(s.shadow_models)),
               str(s.requests), _fmt(s.values["kendall_tau"], "mean"), _fmt(s.values["kendall_tau"], "p5"),
               _fmt(s.values["kendall_tau"], "p50"), _fmt(s.values["spearman"], "mean"),
               _fmt(s.values["overlap_at_10"], "mean"), _fmt(s.values["overlap_at_n"], "mean"),
               _fmt(s.values["ndcg_at_n"], "mean"), *(_fmt(s.mae.get(t, []), "mean") for t in tasks)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summaries: list[ShadowSummary], path: Path) -> Path:
    """Distributions of tau, overlap@10 / overlap@N and per-task |Δp|, one colour per shadow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    bins = np.linspace(-1, 1, 41)
    unit = np.linspace(0, 1, 21)
    for s in summaries:
        axes[0].hist(s.values["kendall_tau"], bins=bins, alpha=0.6, label=s.label)
        axes[1].hist(s.values["overlap_at_10"], bins=unit, alpha=0.6, label=s.label)
        axes[2].hist(s.values["overlap_at_n"], bins=unit, alpha=0.6, label=s.label)
    axes[0].set_title("Kendall tau (fused ranking)")
    axes[1].set_title("top-10 overlap")
    axes[2].set_title("top-N overlap")
    deltas = [(f"{s.label}\n{t}", v) for s in summaries for t, v in sorted(s.mae.items()) if v]
    if deltas:
        axes[3].boxplot([v for _, v in deltas])
        # tick labels set apart: boxplot's own keyword was renamed between matplotlib releases
        axes[3].set_xticks(range(1, len(deltas) + 1), [name for name, _ in deltas], rotation=60, fontsize=7)
        axes[3].set_yscale("symlog", linthresh=1e-4)
        axes[3].set_ylim(bottom=0)
    axes[3].set_title("per-task mean |Δp| per request")
    for ax in axes[:3]:
        ax.set_ylabel("requests")
        if summaries:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", type=Path, help="a JSONL sink directory (RANKSERVE_SHADOW_SINK_DIR) or one .jsonl file")
    p.add_argument("--stream-url", help="read a Redis Stream sink instead: redis:// URL")
    p.add_argument("--stream-key", default="rankserve:shadow", help="stream key (default rankserve:shadow)")
    p.add_argument("--out", type=Path, default=Path("shadow-report"),
                   help="directory for shadow-report.md and shadow-report.png (default ./shadow-report)")


def run(args: argparse.Namespace) -> int:
    if (args.sink is None) == (args.stream_url is None):
        log.error("give exactly one of --sink DIR or --stream-url URL")
        return 2
    try:
        records = read_jsonl(args.sink) if args.sink is not None else read_stream(args.stream_url, args.stream_key)
        summaries = summarize(records)
    except FileNotFoundError as exc:
        log.error("cannot read the sink: %s", exc)
        return 1
    if not summaries:
        log.error("the sink holds no shadow comparisons yet")
        return 1
    table = markdown(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow-report.md").write_text(table + "\n")
    png = plot(summaries, args.out / "shadow-report.png")
    sys.stdout.write(table + f"\n\nPNG: {png}\n")
    return 0
