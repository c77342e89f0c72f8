"""Figures: the report's (heatmap, accuracy vs size/latency, teacher → student gaps, training
curves) and the prototype-score histogram, all written by one ``save_figure``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metakd_ray.io import atomic_file

if TYPE_CHECKING:
    from metakd_ray.report import Setting


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Lay out, write a PNG (atomically: a reader never sees half a file) and free the figure."""
    plt = _pyplot()
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def histogram(path: Path, t: np.ndarray, domain_ids: np.ndarray, domains: list[str]) -> None:
    """Per-domain histograms of the prototype scores t."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, name in enumerate(domains):
        values = t[domain_ids == d]
        if len(values):
            ax.hist(values, bins=30, alpha=0.5, label=name)
    ax.set_xlabel("prototype score t")
    ax.set_ylabel("instances")
    ax.legend()
    save_figure(fig, path)


# --------------------------------------------------------------------------- the report's figures


def domain_groups(settings: list[Setting]) -> list[tuple[list[str], list[Setting]]]:
    """Settings grouped by their domains (Amazon reviews, MNLI genres): one row of panels each."""
    groups: dict[tuple, list] = {}
    for s in settings:
        groups.setdefault(tuple(s.domains), []).append(s)
    return [(list(domains), group) for domains, group in groups.items()]


def heatmap(settings: list[Setting], summary: dict, path: Path) -> None:
    plt = _pyplot()

    panels = []
    for domains, group in domain_groups(settings):
        labels, matrix = [], []
        for s in group:
            for row, cell in summary[s.name]["rows"].items():
                labels.append(row if len(settings) == 1 else f"{row} [{s.name}]")
                matrix.append([cell["per_domain"][d]["mean"] for d in domains] + [cell["avg"]["mean"]])
        panels.append((domains + ["Avg"], labels, np.array(matrix) * 100))
    width = max(len(columns) for columns, _, _ in panels)
    heights = [len(labels) for _, labels, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(1.4 * width + 3, 0.45 * sum(heights) + 1.5 * len(panels)))
    for ax, (columns, labels, values) in zip(axes[:, 0], panels):
        im = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax, label="test accuracy (%)")
    axes[0, 0].set_title("Test accuracy, mean over seeds")
    save_figure(fig, path)


def size_latency(settings: list[Setting], summary: dict, path: Path) -> bool:
    plt = _pyplot()

    points, seen = [], set()
    one_task = len(domain_groups(settings)) == 1
    for s in settings:
        for row, c in summary[s.name]["rows"].items():
            if (c["params"] is None or c["latency_ms"] is None or not np.isfinite(c["avg"]["mean"])
                    or (row, tuple(s.domains)) in seen):
                continue
            shared_teacher = row.startswith("teacher ") and c["shared"]
            if shared_teacher:
                seen.add((row, tuple(s.domains)))  # the same teacher in every setting of these domains: one point
            label = row if len(settings) == 1 or (shared_teacher and one_task) else f"{row} [{s.name}]"
            points.append((label, c["params"], c["latency_ms"], c["avg"]["mean"]))
    if not points:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, index, xlabel in ((axes[0], 1, "encoder parameters (millions)"),
                              (axes[1], 2, "latency (ms, batch 1, 1 thread)")):
        for label, *vals in points:
            x = vals[index - 1] / 1e6 if index == 1 else vals[index - 1]
            ax.scatter(x, vals[2] * 100, marker="s" if label.startswith("teacher") else "o")
            ax.annotate(label, (x, vals[2] * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Avg test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs model size and latency")
    save_figure(fig, path)
    return True


def gaps(bars: list[tuple[str, float]], path: Path) -> bool:
    """Horizontal bars of (row label, teacher Avg − student Avg in points)."""
    if not bars:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:orange")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("teacher Avg − student Avg (points)")
    ax.set_title("Teacher → student gap")
    save_figure(fig, path)
    return True


def curves(settings: list[Setting], histories: dict, path: Path) -> bool:
    plt = _pyplot()

    if not histories:
        return False
    groups = domain_groups([s for s in settings if s.name in histories])
    width = max(len(domains) for domains, _ in groups)
    fig, axes = plt.subplots(len(groups), width, figsize=(4 * width, 3.5 * len(groups)), squeeze=False)
    for i, (domains, group) in enumerate(groups):
        for j, ax in enumerate(axes[i]):
            if j >= len(domains):
                ax.axis("off")
                continue
            for s in group:
                for row, per in histories[s.name].items():
                    if per.get(domains[j]):
                        steps, values = zip(*per[domains[j]])
                        ax.plot(steps, np.array(values) * 100,
                                label=row if len(histories) == 1 else f"{row} [{s.name}]")
            ax.set_title(domains[j])
            ax.set_xlabel("student step")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("dev accuracy (%)")
        axes[i, len(domains) - 1].legend(fontsize=7)
    fig.suptitle("Student dev accuracy during training (first seed)")
    save_figure(fig, path)
    return True
