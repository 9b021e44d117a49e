"""``rayps plot updaters --out paths.png [--steps N]``: the paths of the eleven updaters on two test functions.

Two panels (an ill-conditioned quadratic and Rosenbrock, ``updater_paths.py``), contours plus one path per
updater, each path computed by the real rayps updater. matplotlib is an optional extra (``rayps[plot]``),
imported only when the command runs, with the non-interactive Agg canvas.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .cli import UsageError
from .updater_paths import DEFAULT_STEPS, LEARNING_RATES, QUADRATIC, ROSENBROCK, Objective, updater_paths

INSTALL_HINT = 'matplotlib is needed for plots: pip install "rayps[plot]"'
PLOTS = ("updaters",)

# One look per updater: Adam-family rules share a hue family but differ in line style.
STYLES = {
    "Sgd": ("tab:blue", "-"),
    "Nesterovs": ("tab:orange", "-"),
    "AdaGrad": ("tab:green", "-"),
    "RmsProp": ("tab:red", "-"),
    "AdaDelta": ("tab:brown", "-"),
    "Adam": ("tab:purple", "-"),
    "AdaMax": ("tab:pink", "--"),
    "Nadam": ("tab:olive", "-"),
    "AMSGrad": ("tab:cyan", "--"),
    "AdaBelief": ("black", ":"),
    "NoOp": ("tab:gray", "none"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plot", help="draw figures of the DL4J updaters (needs rayps[plot])",
                                   description="Draw figures; 'updaters': the path of every updater on an "
                                               "ill-conditioned quadratic and on Rosenbrock.")
    parser.add_argument("figure", choices=PLOTS, help="which figure to draw")
    parser.add_argument("--out", required=True,
                        help="output image file; its suffix picks the format (.png, .svg, .pdf)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"updater steps per path (default {DEFAULT_STEPS})")
    parser.set_defaults(run=run)
    return parser


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, imported on first use; UsageError with the install hint when missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional extra
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as error:
        if not (error.name or "").startswith("matplotlib"):
            raise
        raise UsageError(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def _check_out(out: str, supported: dict) -> Path:
    path = Path(out)
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"--out: directory {str(directory)!r} does not exist")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UsageError(f"--out: {out!r} must end in one of {', '.join('.' + s for s in sorted(supported))}")
    return path


def _draw_panel(ax, objective: Objective, paths: dict[str, np.ndarray]) -> None:
    (x0, x1), (y0, y1) = objective.x_range, objective.y_range
    xs, ys = np.meshgrid(np.linspace(x0, x1, 400), np.linspace(y0, y1, 400))
    zs = objective.value(xs, ys)
    fmin = objective.value(*objective.minimum)
    levels = fmin + np.geomspace(1e-2, float(zs.max() - fmin), 13)
    ax.contourf(xs, ys, zs, levels=np.concatenate(([fmin], levels)), cmap="Blues", alpha=0.45)
    ax.contour(xs, ys, zs, levels=levels, colors="0.6", linewidths=0.4)

    rates = LEARNING_RATES[objective.name]
    for name, path in paths.items():
        color, style = STYLES[name]
        lr = rates[name]
        if name == "NoOp":
            ax.plot(*path[-1], marker="s", markersize=11, markerfacecolor="none", markeredgecolor=color,
                    markeredgewidth=1.5, linestyle="none", label="NoOp  stays at the start")
            continue
        finite = path[np.all(np.isfinite(path), axis=1)]
        distance = float(np.hypot(*(finite[-1] - np.asarray(objective.minimum))))
        ends = "diverged" if len(finite) < len(path) else "<1e-6" if distance < 1e-6 else f"{distance:.2g}"
        label = f"{name}  {'no lr' if lr is None else f'lr {lr:g}'}  \u2192 {ends}"
        ax.plot(finite[:, 0], finite[:, 1], color=color, linestyle=style, linewidth=1.5, alpha=0.9, label=label)
        ax.plot(*finite[-1], marker="o", markersize=7, color=color, markeredgecolor="black", markeredgewidth=0.6,
                linestyle="none", zorder=4)
    ax.plot(*objective.start, marker="*", markersize=14, color="gold", markeredgecolor="black", linestyle="none",
            label="start", zorder=5)
    ax.plot(*objective.minimum, marker="X", markersize=10, color="white", markeredgecolor="black",
            linestyle="none", label="minimum", zorder=5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(objective.formula, fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=8.5, frameon=False,
              title="updater  learning rate  \u2192 distance from the minimum at the end (dot)", title_fontsize=8.5)


def updater_paths_figure(steps: int):
    """The two-panel figure (a matplotlib ``Figure`` on an Agg canvas) of every updater's path."""
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(15, 7.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    _draw_panel(left, QUADRATIC, updater_paths(QUADRATIC, steps))
    _draw_panel(right, ROSENBROCK, updater_paths(ROSENBROCK, steps))
    left.set_title(f"Ill-conditioned quadratic  {QUADRATIC.formula}", fontsize=11)
    right.set_title(f"Rosenbrock  {ROSENBROCK.formula}", fontsize=11)
    figure.suptitle(f"rayps (DL4J/ND4J updaters as coded): {steps} steps from a fixed start; "
                    "other hyperparameters at DL4J defaults", fontsize=13)
    return figure


def run(args) -> int:
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    Figure, FigureCanvasAgg = _matplotlib()
    out = _check_out(args.out, FigureCanvasAgg(Figure()).get_supported_filetypes())
    figure = updater_paths_figure(args.steps)
    try:
        figure.savefig(out, format=out.suffix.lower().lstrip("."))
    except OSError as error:
        raise UsageError(f"--out: cannot write {str(out)!r}: {error.strerror or error}") from None
    print(f"rayps plot updaters: wrote {out}")
    return 0
