"""Pictures of patterns: the token-level mask beside the block layout, with the density."""

from __future__ import annotations

from pathlib import Path


from ..patterns import Pattern


def pyplot():
    """matplotlib's pyplot on the headless Agg backend; ImportError without the `viz` extra."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path, dpi: int) -> Path:
    """Write ``fig`` as an image (folders created) and free it; the path written, ``.png`` added to a name
    without a suffix (matplotlib adds it too, and the caller should report the file that exists)."""
    out = Path(out)
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    fig.clf()
    pyplot().close(fig)
    return out


def draw_pattern(pattern: Pattern, seq_len: int, out: str | Path, *, kv_len: int | None = None, block: int = 64,
                 num_heads: int = 1, head: int = 0) -> Path:
    """Save a PNG: the token mask of ``head`` (left) and its block layout (right), titled with density."""
    plt = pyplot()

    if not 0 <= head < num_heads:
        raise ValueError(f"head must be in [0, {num_heads}), got {head}")
    dense = pattern.dense(seq_len, kv_len, num_heads=num_heads)
    if dense.dim() == 4:  # per-example pattern: show the first example
        dense = dense[0]
    layout = pattern.block_layout(seq_len, kv_len, block=block, num_heads=num_heads)
    if layout.dim() == 4:
        layout = layout[0]
    token = dense[min(head, dense.shape[0] - 1)]
    blocks = layout[min(head, layout.shape[0] - 1)]
    density = token.float().mean().item()
    block_density = blocks.float().mean().item()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    axes[0].imshow(token.numpy() if token.numel() <= 4096**2 else token[::4, ::4].numpy(), cmap="Blues", vmin=0, vmax=1,
                   interpolation="nearest", extent=(0, token.shape[1], token.shape[0], 0))
    axes[0].set_title(f"token mask: density {density:.4f}")
    axes[1].imshow(blocks.numpy(), cmap="Oranges", vmin=0, vmax=1, interpolation="nearest",
                   extent=(0, blocks.shape[1], blocks.shape[0], 0))
    axes[1].set_title(f"block layout ({block}x{block}): {int(blocks.sum())}/{blocks.numel()} blocks "
                      f"= {block_density:.3f}")
    for ax, unit in zip(axes, ("token", "block")):
        ax.set_xlabel(f"key {unit} j")
        ax.set_ylabel(f"query {unit} i")
    head_note = f", head {head} of {num_heads}" if num_heads > 1 else ""
    fig.suptitle(f"{pattern.name}  (Nq={seq_len}, Nk={kv_len or seq_len}{head_note})")
    return save_figure(fig, out, dpi=110)


def draw_bench(rows: list[dict], out: str | Path) -> Path:
    """Save a PNG from ``bench.json`` rows: time (ms) against sequence length, one panel per
    (pattern, dtype, mode), one line per path, log-log so that linear and quadratic paths separate."""
    plt = pyplot()

    panels = sorted({(r["pattern"], r["dtype"], r["mode"]) for r in rows})
    paths = sorted({r["path"] for r in rows})
    colour = {p: plt.cm.tab10(n % 10) for n, p in enumerate(paths)}  # one colour per path in every panel
    cols = min(3, len(panels)) or 1
    nrows = -(-len(panels) // cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (pattern, dtype, mode) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["pattern"], r["dtype"], r["mode"]) == (pattern, dtype, mode) and r["time_ms"]]
        for path in sorted({r["path"] for r in sel}):
            pts = sorted((r["seq_len"], r["time_ms"]) for r in sel if r["path"] == path)
            ax.plot(*zip(*pts), marker="o", label=path, color=colour[path])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{pattern} {dtype} {mode}", fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, out, dpi=100)
