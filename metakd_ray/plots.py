"""Figures: the report's (heatmap, accuracy vs size/latency, teacher → student gaps, training
curves) and the prototype-score histogram, all written by one ``save_figure``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from metakd_ray.report import Setting


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Lay out, write a PNG and free the figure."""
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
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


def heatmap(settings: list[Setting], summary: dict, path: Path) -> None:
    plt = _pyplot()

    labels, matrix, columns = [], [], None
    for s in settings:
        columns = s.domains + ["Avg"]
        for row, cell in summary[s.name]["rows"].items():
            labels.append(row if len(settings) == 1 else f"{row} [{s.name}]")
            matrix.append([cell["per_domain"][d]["mean"] for d in s.domains] + [cell["avg"]["mean"]])
    values = np.array(matrix) * 100
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 3, 0.45 * len(labels) + 1.5))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(labels)), labels)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title("Test accuracy, mean over seeds")
    save_figure(fig, path)


def size_latency(settings: list[Setting], summary: dict, path: Path) -> bool:
    plt = _pyplot()

    points, seen = [], set()
    for s in settings:
        for row, c in summary[s.name]["rows"].items():
            if c["params"] is None or c["latency_ms"] is None or not np.isfinite(c["avg"]["mean"]) or row in seen:
                continue
            if row.startswith("teacher ") and c["shared"]:
                seen.add(row)  # the same teacher in every setting: one point
            label = row if len(settings) == 1 or row in seen else f"{row} [{s.name}]"
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
    domains = settings[0].domains
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.5), squeeze=False)
    for j, d in enumerate(domains):
        ax = axes[0, j]
        for setting, rows in histories.items():
            for row, per in rows.items():
                if per.get(d):
                    steps, values = zip(*per[d])
                    ax.plot(steps, np.array(values) * 100, label=row if len(histories) == 1 else f"{row} [{setting}]")
        ax.set_title(d)
        ax.set_xlabel("student step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("dev accuracy (%)")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("Student dev accuracy during training (first seed)")
    save_figure(fig, path)
    return True
