"""Pictures of results: the schedule heatmap (model calls x sub-layers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.schedule import Schedule, format_model_time
from ..core.images import figure_to_png


def schedule_heatmap(schedule: Schedule, path: str | Path, title: str | None = None,
                     mac_fraction: float | None = None, experts: list[tuple[int, str]] | None = None) -> None:
    """Writes :func:`schedule_figure` as a PNG."""
    figure_to_png(schedule_figure(schedule, title, mac_fraction, experts), Path(path))


def schedule_figure(schedule: Schedule, title: str | None = None, mac_fraction: float | None = None,
                    experts: list[tuple[int, str]] | None = None):
    """The schedule as a heatmap: one row per model call (DPM-Solver-2S makes two a step), labelled with the time
    the model sees, rounded (:func:`l2c_export.core.schedule.format_model_time`); one column per sub-layer
    (attention, MLP alternating); computed sub-layers in blue, the count of each row at its right. ``experts``: a
    pipeline's (Wan2.2's), (first call, name) of each: a red line above each switch, the expert named below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n, width = schedule.compute.shape
    figure, axis = plt.subplots(figsize=(max(6.0, width * 0.16 + 2), max(3.0, n * 0.22 + 1.5)))
    axis.imshow(schedule.compute.astype(np.uint8), cmap=ListedColormap(["#f2f2f2", "#2b6cb0"]), aspect="auto",
                interpolation="nearest", vmin=0, vmax=1)
    axis.set_xlabel("sub-layer (2j attention, 2j+1 MLP of block j)")
    axis.set_ylabel("model call (time the model sees)" if schedule.timesteps else "model call")
    ticks = range(0, width, 2 if width <= 24 else 4)
    axis.set_xticks(list(ticks))
    axis.set_xticklabels([f"b{i // 2}" for i in ticks], fontsize=7)
    axis.set_yticks(range(n))
    axis.set_yticklabels([f"{s} (t={format_model_time(schedule.timesteps[s])})" if schedule.timesteps else str(s)
                          for s in range(n)], fontsize=7)
    computed = schedule.computed_per_step()
    for s, count in enumerate(computed):
        axis.text(width - 0.4, s, f" {count}/{width}", va="center", ha="left", fontsize=7)
    if schedule.sublayers is not None:  # named sub-layers (a diffusers model): every column labelled with its name
        axis.set_xlabel("sub-layer")
        axis.set_xticks(range(width))
        axis.set_xticklabels(schedule.sublayers, fontsize=6, rotation=90)
    for first, name in experts or ():
        if first:
            axis.axhline(first - 0.5, color="#c53030", linewidth=1.5)
        axis.text(-0.45, first - 0.45, name, va="top", ha="left", fontsize=7, color="#c53030",
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    summary = f"{int(schedule.compute.sum())}/{schedule.compute.size} sub-layers computed (blue)"
    if mac_fraction is not None:
        summary += f", MAC fraction {mac_fraction:.3f}, ideal speedup {1 / mac_fraction:.2f}x"
    axis.set_title((title + "\n" if title else "") + summary, fontsize=9)
    return figure
