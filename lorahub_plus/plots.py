"""The PNG plots written beside results: loss curves (experts' training, the gate, the hypernetwork) and the
library summary's accuracy scatter. matplotlib loads on first use, with the Agg backend (no display needed),
and `png` is the one way a figure reaches disk: whole, by rename, or not at all."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from lorahub_plus.library.atomic import atomic_file


@contextmanager
def png(path: Path, dpi: int, **subplots):
    """Yields `(fig, axes)` from `plt.subplots(**subplots)` to draw on; after the block the figure, laid out
    tight, replaces `path` as a PNG in one rename. The figure is closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    """One panel per named loss curve: the raw losses per step and a running mean, or, for a curve of
    (step, loss) pairs (measured every few steps), those points."""
    panels = max(len(losses), 1)
    with png(path, 100, ncols=panels, figsize=(5 * panels, 3.2), squeeze=False) as (_, axes):
        for ax, (name, values) in zip(axes[0], losses.items()):
            ax.set(title=name, xlabel="step", ylabel="loss")
            if values and isinstance(values[0], (list, tuple)):
                ax.plot(*zip(*values), marker="o", lw=1.5)
                continue
            ax.plot(values, lw=0.6, alpha=0.5)
            window = max(1, len(values) // 20)
            smooth = [sum(values[max(0, i - window):i + 1]) / len(values[max(0, i - window):i + 1])
                      for i in range(len(values))]
            ax.plot(smooth, lw=1.5)


def plot_accuracy(points: list[tuple[float, float]], path: Path) -> None:
    """Expert against base accuracy, one (base, expert) point per expert, over the diagonal where they tie."""
    with png(path, 110, figsize=(5, 5)) as (_, ax):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        ax.scatter([b for b, _ in points], [e for _, e in points], s=18)
        ax.set(xlabel="base model accuracy (held-out)", ylabel="expert accuracy (held-out)", xlim=(0, 1),
               ylim=(0, 1), title=f"{len(points)} experts: above the line = expert helps")
