"""The evaluation's pictures (:mod:`l2c_export.demo.evaluate`): FD and PSNR against MAC fraction, and the
text-to-image grid of a few prompts' images per method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.images import figure_to_png
from .methods import Candidate, TextToImagePrompts


GRID_METHODS = ("full", "l2c", "cache-dit")  # the grid's columns


def grid_samples(prompts: TextToImagePrompts, candidates: list[Candidate], samples_by_key: dict) -> dict:
    """One prompt per digit (caption forms in turn, held-out ones included) and its images of :data:`GRID_METHODS`
    at the matched point: {"captions": [...], "held_out": [...], method: (k, C, H, W)}."""
    chosen = one_prompt_per_digit(prompts)
    out = {"captions": [prompts.captions[i] for i in chosen], "held_out": [bool(prompts.held_out[i]) for i in chosen]}
    for method in GRID_METHODS:
        candidate = next((c for c in candidates if c.method == method and c.point in ("reference", "matched")), None)
        if candidate is not None:
            out[method] = samples_by_key[candidate.key()][chosen]
    return out


def one_prompt_per_digit(prompts: TextToImagePrompts) -> list[int]:
    """The sample index of one prompt per digit present, the caption forms in turn (held-out ones included)."""
    chosen = []
    for digit in range(10):
        rows = [i for i in np.flatnonzero(prompts.digits == digit)]
        if rows:
            forms = list(dict.fromkeys(prompts.captions[i] for i in rows))
            wanted = forms[digit % len(forms)]
            chosen.append(next(i for i in rows if prompts.captions[i] == wanted))
    return chosen


def save_clip_grid(methods: list[np.ndarray], path: Path) -> None:
    """A video model's grid: one animated image (``.gif``, ``.webp``; or ``.mp4``), a row of k clips (k, 3, F, H, W)
    per method in ``methods`` order, the prompts in the columns (:func:`l2c_export.core.images.save_clip`)."""
    from ..core.images import save_clip

    save_clip(np.concatenate(methods), path, columns=len(methods[0]), scale=8, fps=4)


def plot_t2i_grid(grid: dict, path: Path) -> None:
    """The grid of :func:`grid_samples`: a row per prompt (its caption, "held-out form" marked), a column per
    method; a video model's clips as an animated image (:func:`save_clip_grid`: a row per method, a column per
    prompt)."""
    methods = [m for m in GRID_METHODS if m in grid]
    if grid[methods[0]].ndim == 5:
        save_clip_grid([grid[m] for m in methods], path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(grid["captions"])
    figure, axes = plt.subplots(rows, len(methods), figsize=(1.5 * len(methods) + 2.6, 1.25 * rows), squeeze=False)
    titles = {"full": "full compute", "l2c": "learned schedule", "cache-dit": "cache-dit DBCache"}
    for r, text in enumerate(grid["captions"]):
        for c, method in enumerate(methods):
            axis = axes[r][c]
            axis.imshow(np.clip(grid[method][r, 0], -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(titles.get(method, method), fontsize=8)
        label = f'"{text}"' + ("\n(held-out form)" if grid["held_out"][r] else "")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    figure.tight_layout()
    figure_to_png(figure, path, dpi=110)


def plot_fd(report: dict, path: Path) -> None:
    """Left: FD against MAC fraction (to the reference data where there are some, else to full compute), one line per
    method, full compute dashed and the learned schedule marked. Right: PSNR against the full-compute samples, the
    same lines. A method without a style of its own gets the next colour of matplotlib's cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"l2c": ("#2b6cb0", "o"), "fora": ("#dd6b20", "s"), "random": ("#718096", "^"),
              "fewer-steps": ("#38a169", "D"), "cache-dit": ("#c53030", "P")}
    rows = report["results"]
    full = next(r for r in rows if r["method"] == "full")
    learned = next((r for r in rows if r["method"] == "l2c" and r["point"] == "matched"), None)
    # FD to the data where there are some, except for a text-to-image model: its methods' FD to the digits differ by
    # less than the samples' own spread, so its plot shows how far each moves full compute's samples
    fd_metric = "fd" if full["fd"] is not None and "prompts" not in report else "fd_to_full"
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full" and "precision" not in r))
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][4:] * 4)
    figure, (fd_axis, psnr_axis) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for axis, metric in ((fd_axis, fd_metric), (psnr_axis, "psnr")):
        for method in methods:
            color, marker = styles.setdefault(method, (next(cycle), "v"))
            points = sorted({(r["mac_fraction"], r[metric]) for r in rows if r["method"] == method
                             and r[metric] is not None})
            if points:
                axis.plot(*zip(*points), color=color, marker=marker, label=method, linewidth=1.5, markersize=5)
        if learned:
            axis.axvline(learned["mac_fraction"], color="#2b6cb0", linestyle=":", linewidth=1,
                         label="learned schedule")
        sampler = report["sampler"]
        axis.set_xlabel(f"MAC fraction (of full compute, {sampler['num_calls']} {sampler['kind']} model calls)")
        axis.grid(True, alpha=0.3)
    if fd_metric == "fd":
        fd_axis.axhline(full["fd"], color="black", linestyle="--", linewidth=1,
                        label=f"full compute ({full['fd']:.2f})")
        fd_axis.set_ylabel("Frechet distance to the digits (classifier features)")
    else:
        features = "classifier features" if full["fd"] is not None else "random projection"
        fd_axis.set_ylabel(f"Frechet distance to full compute ({features})")
    fd_axis.set_title("FD (lower is better)", fontsize=9)
    psnr_axis.set_ylabel("PSNR against full compute (dB)")
    psnr_axis.set_title("PSNR against the full-compute samples (higher is better)", fontsize=9)
    fd_axis.legend(fontsize=8)
    figure.suptitle(f"{report['model']}, {report['num_samples']} samples from the same noise, guidance "
                    f"{report['cfg_scale']:g}", fontsize=10)
    figure_to_png(figure, path, dpi=110)


def plot_curve(report: dict, path: Path, speed_path: Path | None = None) -> None:
    """``eval --budgets`` on a text-to-image model (:mod:`l2c_export.demo.curve`): FD to full compute and PSNR
    against MAC fraction, one line per method (a budget not reached: a hollow marker), to ``path``; PSNR against
    measured seconds per image (each method in its own runtime; ours on ONNX Runtime, and PyTorch dashed) to
    ``speed_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["budget"] is not None and r.get("psnr") is not None]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    learned = {"l2c": "black", "l2c-general": "#1a365d"}  # ours, learned (official, general mode): bold
    others = [m for m in methods if m not in learned]
    palette = list(plt.get_cmap("tab10").colors) + [plt.get_cmap("tab20").colors[1], plt.get_cmap("tab20").colors[5]]
    colors = {**learned, **dict(zip(others, palette * 2))}
    markers = dict(zip(methods, "osDP^v<>hX*" * 2))

    def lines(axis, x_of, y_of, suffix="", linestyle="-"):
        for method in methods:
            points = sorted((x_of(r), y_of(r), r.get("reached", True)) for r in rows
                            if r["method"] == method and x_of(r) is not None)
            if not points:
                continue
            axis.plot([p[0] for p in points], [p[1] for p in points], color=colors[method], linestyle=linestyle,
                      linewidth=1.8 if method in learned else 1.1, label=method + suffix)
            for x, y, reached in points:
                axis.plot(x, y, marker=markers[method], color=colors[method], markersize=5,
                          markerfacecolor=colors[method] if reached else "none")

    figure, (fd_axis, psnr_axis) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    lines(fd_axis, lambda r: r["mac_fraction"], lambda r: r["fd_to_full"])
    lines(psnr_axis, lambda r: r["mac_fraction"], lambda r: r["psnr"])
    sampler = report["sampler"]
    for axis in (fd_axis, psnr_axis):
        axis.set_xlabel(f"MAC fraction (counted from what ran; {sampler['num_calls']} steps)")
        axis.grid(True, alpha=0.3)
        for budget in report["budgets"]:
            axis.axvline(budget, color="#a0aec0", linewidth=0.6, linestyle=":")
    fd_axis.set_yscale("log")
    fd_axis.set_ylabel("FD to full compute (" + ("classifier features" if "classifier" in report["features"]
                                                 else "random projection") + ", log)")
    psnr_axis.set_ylabel("PSNR against full compute (dB)")
    psnr_axis.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"{report['model']}: {report['num_samples']} images per method and budget, guidance "
                    f"{report['cfg_scale']:g} (hollow: budget not reached within {report['tolerance']})", fontsize=10)
    figure_to_png(figure, path, dpi=110)
    if speed_path is None:
        return
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    lines(axis, lambda r: r.get("seconds_per_image"), lambda r: r["psnr"])
    lines(axis, lambda r: r.get("seconds_per_image_torch"), lambda r: r["psnr"], " (PyTorch sample)", "--")
    for row in report["results"]:
        if row["budget"] is None and row.get("seconds_per_image"):
            axis.axvline(row["seconds_per_image"], color="black", linewidth=0.7, linestyle=":")
            axis.annotate(f"{row['method']} ({row['runtime']})", (row["seconds_per_image"], 0.02),
                          xycoords=("data", "axes fraction"), rotation=90, fontsize=6, va="bottom")
    axis.set_xlabel("seconds per image, measured (ours: ONNX Runtime; peers: diffusers in PyTorch)")
    axis.set_ylabel("PSNR against full compute (dB)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"{report['model']}: quality against wall time ({report['timing']['threads']} threads)",
                   fontsize=10)
    figure_to_png(figure, speed_path, dpi=110)


def plot_curve_grid(grid: dict, path: Path) -> None:
    """The grid of :func:`l2c_export.demo.curve.evaluate_curve`: a row per method (at the lowest budget, its MAC
    fraction in brackets; full compute first), a column per prompt; a video model's clips as an animated image
    (:func:`save_clip_grid`, the rows in the order of ``grid["methods"]``)."""
    if grid["methods"] and grid["methods"][0][1].ndim == 5:
        save_clip_grid([clips for _, clips in grid["methods"]], path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, columns = grid["methods"], len(grid["captions"])
    figure, axes = plt.subplots(len(methods), columns, figsize=(0.95 * columns + 2.4, 0.95 * len(methods) + 0.8),
                                squeeze=False)
    for r, (label, images) in enumerate(methods):
        for c in range(columns):
            axis = axes[r][c]
            if images.shape[1] == 3:  # RGB in [-1, 1]
                axis.imshow(np.clip(images[c].transpose(1, 2, 0) / 2 + 0.5, 0, 1), interpolation="nearest")
            else:
                axis.imshow(np.clip(images[c, 0], -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(grid["captions"][c] + (" (held out)" if grid["held_out"][c] else ""), fontsize=5)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    figure.suptitle(f"every method at MAC fraction budget {grid['budget']}", fontsize=9)
    figure.tight_layout()
    figure_to_png(figure, path, dpi=110)
