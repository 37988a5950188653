"""One PNG per run: per-step time by case (median, p10-p90 whiskers) and images/s against
batch size, vanilla and DeLeaker variants side by side. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path


def plot_records(records: list[dict], path: str | Path, title: str = "deleaker-bench") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    path = Path(path)
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.8))
    if any(r.get("random_weights") for r in records):
        title += "  [random_weights: true - timing only]"
    fig.suptitle(title, fontsize=11)

    # Left: per-step median at the smallest batch, grouped by case, one bar per variant.
    bmin = min((r["batch_size"] for r in ok), default=1)
    sel = [r for r in ok if r["batch_size"] == bmin]
    cases = list(dict.fromkeys(_case(r) for r in sel))
    labels = list(dict.fromkeys(f"{r['backend']} {r['label']}" for r in sel))
    all_labels = list(dict.fromkeys(f"{r['backend']} {r['label']}" for r in ok))
    colours = {lab: f"C{i % 10}" for i, lab in enumerate(all_labels)}
    width = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(cases):
            r = next((r for r in sel if _case(r) == c and f"{r['backend']} {r['label']}" == lab), None)
            if r is None:
                continue
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            ys.append(r["step_median_s"] * 1e3)
            lo.append((r["step_median_s"] - r["step_p10_s"]) * 1e3)
            hi.append((r["step_p90_s"] - r["step_median_s"]) * 1e3)
        ax_t.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=lab, color=colours[lab])
    ax_t.set_xticks(range(len(cases)))
    ax_t.set_xticklabels(cases, fontsize=8)
    ax_t.set_ylabel("ms per transformer step (median, p10-p90)")
    ax_t.set_title(f"per-step time, batch {bmin}", fontsize=10)
    if labels:
        ax_t.legend(fontsize=8)
    if ys_positive(sel):
        ax_t.set_yscale("log")

    # Right: images/s against batch size. Colour: backend + variant (as on the left);
    # marker: image size; solid: step mode (transformer only), dashed: end to end.
    sizes = list(dict.fromkeys(f"{r['width']}x{r['height']}" for r in ok))
    markers = dict(zip(sizes, "osD^v<>p*h" * 3))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in ok:
        if r.get("images_per_s"):
            key = (f"{r['backend']} {r['label']}", f"{r['width']}x{r['height']}", r["mode"])
            series.setdefault(key, []).append((r["batch_size"], r["images_per_s"]))
    for (lab, size, mode), pts in series.items():
        pts.sort()
        # e2e: dashed with hollow markers, so it never reads as the step line of the same colour
        ax_b.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[size], color=colours.get(lab),
                  linestyle="-" if mode == "step" else "--", markerfacecolor=None if mode == "step" else "none")
    ax_b.set_xlabel("batch size")
    ax_b.set_ylabel("images/s (step: transformer only, S steps; e2e: whole generation)", fontsize=8)
    ax_b.set_title("throughput", fontsize=10)
    bs = sorted({r["batch_size"] for r in ok})
    if bs:
        ax_b.set_xticks(bs)
    if series:
        ax_b.set_yscale("log")
        ax_b.legend(handles=_legend_handles(series, colours, markers), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend_handles(series: dict, colours: dict, markers: dict) -> list:
    """One legend entry per variant (colour), image size (marker) and mode (line style), not one per
    combination."""
    from matplotlib.lines import Line2D

    labs = list(dict.fromkeys(k[0] for k in series))
    sizes = list(dict.fromkeys(k[1] for k in series))
    modes = list(dict.fromkeys(k[2] for k in series))
    handles = [Line2D([], [], color=colours.get(lab), lw=6, label=lab) for lab in labs]
    handles += [Line2D([], [], color="grey", marker=markers[size], linestyle="none", label=size) for size in sizes]
    handles += [Line2D([], [], color="grey", linestyle="-" if m == "step" else "--",
                       marker="o", markerfacecolor=None if m == "step" else "none", label=m) for m in modes]
    return handles


def _case(r: dict) -> str:
    return f"{r['mode']}\n{r['width']}x{r['height']}\nE={r['entities']} S={r['steps']}"


def ys_positive(rows: list[dict]) -> bool:
    """Log scale when times span more than 20x (vanilla vs the reference op on a GPU)."""
    v = [r["step_median_s"] for r in rows if r.get("step_median_s")]
    return bool(v) and min(v) > 0 and max(v) / min(v) > 20
