"""PNG plots of a sparsity profile (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnsparse.core.plotting import pyplot
from attnsparse.measure.profile import Profile, coverage_key


def _pyplot():  # type: ignore[no-untyped-def]
    return pyplot()


def _heatmap(matrix: np.ndarray, title: str, label: str, path: Path, *, log: bool = False,
             cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> Path:
    """Layers (rows) x heads (columns) heatmap with a colour bar; NaN cells are grey."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    layers, heads = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.55 * heads, 12), min(1.5 + 0.28 * layers, 14)))
    data = np.ma.masked_invalid(matrix)
    colormap = plt.get_cmap(cmap).with_extremes(bad="#cccccc")
    norm = None
    if log:
        positive = matrix[np.isfinite(matrix) & (matrix > 0)]
        low = float(positive.min()) if positive.size else 1.0
        high = float(positive.max()) if positive.size else 10.0
        norm = LogNorm(vmin=low, vmax=max(high, low * 1.01))
        image = ax.imshow(data, aspect="auto", cmap=colormap, norm=norm, interpolation="nearest")
    else:
        image = ax.imshow(data, aspect="auto", cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coverage_curves(profile: Profile, path: Path) -> Path:
    """Mean top-k mass against k (log x), one line per layer (mean over its heads)."""
    plt = _pyplot()
    st = profile.head_stats()
    ks = np.array(profile.config.ks)
    layers = st["topk_mass"].shape[0]
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(layers, 2)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for layer in range(layers):
        ax.plot(ks, st["topk_mass"][layer].mean(axis=0), color=colors[layer], lw=1.2,
                label=f"layer {layer}" if layers <= 12 or layer % max(1, layers // 10) == 0 else None)
    for delta in profile.config.deltas:
        ax.axhline(1 - delta, color="#999999", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (keys kept)")
    ax.set_ylabel("mean top-k mass")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Coverage curves (ctx {profile.config.ctx}); dotted lines: coverage 1-δ")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_k_vs_position(profile: Profile, path: Path) -> Path:
    """Geometric-mean k_{1-δ} against query row length n_i (log-log), per layer, with the pooled n^C fit."""
    plt = _pyplot()
    logn, logk, rows = profile.position_curves()
    layers = logn.shape[0]
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(layers, 2)))
    fig, ax = plt.subplots(figsize=(8, 5))
    pooled_rows = rows.sum(axis=(0, 1))
    used = pooled_rows > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        n_centre = np.exp((logn * rows).sum(axis=(0, 1)) / pooled_rows)
        for layer in range(layers):
            counts = rows[layer].sum(axis=0)
            k_layer = np.exp((logk[layer] * rows[layer]).sum(axis=0) / counts)
            ok = used & (counts > 0)
            ax.plot(n_centre[ok], k_layer[ok], color=colors[layer], lw=1, alpha=0.8,
                    label=f"layer {layer}" if layers <= 12 or layer % max(1, layers // 10) == 0 else None)
        k_all = np.exp((logk * rows).sum(axis=(0, 1)) / pooled_rows)
    ax.plot(n_centre[used], k_all[used], color="black", lw=2, marker="o", ms=3, label="all heads")
    fit = profile.config.fit_min_n
    sel = used & (n_centre >= fit) & np.isfinite(k_all)
    if sel.sum() >= 2:
        slope, intercept = np.polyfit(np.log(n_centre[sel]), np.log(k_all[sel]), 1)
        xs = np.array([n_centre[sel].min(), n_centre[sel].max()])
        ax.plot(xs, np.exp(intercept) * xs**slope, "r--", lw=1.5, label=f"fit on bin means: k ∝ n^{slope:.2f}")
    key = coverage_key(profile.config.fit_delta)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("row length n_i = query position + 1")
    ax.set_ylabel(f"geometric-mean k_{key}")
    ax.set_title(f"k at coverage {key} against query position (fit over n_i ≥ {fit})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_head_classes(profile: Profile, path: Path) -> Path:
    """Streaming (sink+local mass >= 1-δ) versus retrieval heads, each cell annotated with its sink+local mass."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    st = profile.head_stats()
    classes = st["streaming"].astype(float)
    layers, heads = classes.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.6 * heads, 12), min(1.5 + 0.3 * layers, 14)))
    ax.imshow(classes, aspect="auto", cmap=ListedColormap(["#4c72b0", "#dd8452"]), vmin=0, vmax=1,
              interpolation="nearest")
    if layers * heads <= 400:
        for layer in range(layers):
            for head in range(heads):
                ax.text(head, layer, f"{st['stream_long'][layer, head]:.2f}", ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    cfg = profile.config
    ax.set_title(f"Head classes: streaming if sink({cfg.sink_tokens})+local({cfg.local_window}) mass "
                 f"≥ {1 - cfg.stream_delta:g}", fontsize=9)
    ax.legend(handles=[Patch(color="#dd8452", label="streaming"), Patch(color="#4c72b0", label="not streaming")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(profile: Profile, directory: str | Path) -> dict[str, tuple[Path, str]]:
    """All plots of a profile into `directory`; returns {name: (path, caption)} in report order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st = profile.head_stats()
    cfg = profile.config
    key = coverage_key(cfg.fit_delta)
    d = cfg.fit_index
    figures = {
        "k_heatmap": (
            _heatmap(st["kcov_mean"][..., d], f"Mean k_{key} per head (ctx {cfg.ctx})", f"mean k_{key} (log)",
                     directory / "heatmap_k.png", log=True),
            f"Mean k at coverage {key}: keys needed to hold {key} of each row's mass, averaged over rows.",
        ),
        "C_heatmap": (
            _heatmap(st["C"], "n^C exponent per head", "C (slope of log k on log n)", directory / "heatmap_C.png",
                     cmap="magma", vmin=0.0, vmax=1.0),
            f"C: least-squares slope of log k_{key}(row) against log n_i over rows with n_i ≥ {cfg.fit_min_n}.",
        ),
        "coverage": (plot_coverage_curves(profile, directory / "coverage_curves.png"),
                     "Mean top-k mass against k, one line per layer (mean over the layer's heads)."),
        "k_vs_position": (plot_k_vs_position(profile, directory / "k_vs_position.png"),
                          f"k_{key} against row length (log-log), per layer and pooled, with the power-law fit."),
        "classes": (plot_head_classes(profile, directory / "head_classes.png"),
                    "Head classes; numbers are each head's mean sink+local mass over rows longer than sink+window."),
    }
    return figures
