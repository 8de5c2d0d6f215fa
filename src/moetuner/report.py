"""An HTML report of an evaluation: comparison table and plots (matplotlib, Agg backend).

``write_report`` writes ``index.html`` plus one PNG per figure into a directory; the page
also embeds the PNGs (base64), so it can be opened or mailed on its own. Figures:

- ``load.png``: per-layer GPU load / mean GPU load, one heatmap per placement (``linear``,
  the "before", first);
- ``traffic.png``: GPU x GPU token messages summed over layers, per placement and execution
  model;
- ``transitions.png``: the trace's cross-layer expert transitions from a chosen layer to the
  next (rows normalised).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moetuner.costmodel import MODEL_NOTE  # noqa: E402
from moetuner.counts import Replay  # noqa: E402
from moetuner.io import write_together  # noqa: E402

# What write_report writes into its directory, the page last.
FILES = ("load.png", "traffic.png", "transitions.png", "index.html")

TABLE_COLUMNS = (
    ("placement", "placement", "{}"), ("exec_model", "exec", "{}"),
    ("replica_policy", "replicas", "{}"), ("slots_per_gpu", "slots/GPU", "{}"),
    ("imbalance", "imbalance", "{:.3f}"), ("balancedness", "balancedness", "{:.3f}"),
    ("share_cross_gpu", "cross-GPU moves", "{:.1%}"),
    ("share_cross_node", "cross-node moves", "{:.1%}"),
    ("step_imbalance", "step imbalance", "{:.3f}"),
    ("mean_step_time_s", "MoE time / step, mean (ms)", "ms"),
    ("p99_step_time_s", "p99 (ms)", "ms"),
    ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("speedup_vs_linear", "speedup vs linear", "{:.3f}x"),
    ("experts_moved", "online: experts moved", "{}"),
    ("move_time_per_step_s", "online: move time / step (ms)", "ms"),
)


def load_figure(replays: dict[str, Replay]) -> plt.Figure:
    """Heatmaps ``[L, G]`` of load / mean load per layer, one per placement."""
    fig, axes = plt.subplots(1, len(replays), figsize=(3.2 * len(replays) + 1, 4.5),
                             squeeze=False, sharey=True)
    top = max(float(_relative_load(r).max()) for r in replays.values())
    for ax, (name, result) in zip(axes[0], replays.items(), strict=True):
        image = ax.imshow(_relative_load(result), aspect="auto", cmap="magma", vmin=0, vmax=top)
        ax.set_title(f"{name}\nimbalance {result.imbalance:.2f}", fontsize=9)
        ax.set_xlabel("GPU")
    axes[0, 0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="GPU load / mean")
    return fig


def _relative_load(result: Replay) -> np.ndarray:
    mean = result.load.mean(axis=1, keepdims=True)
    return np.divide(result.load, mean, out=np.zeros(result.load.shape), where=mean > 0)


def traffic_figure(replays: dict[tuple[str, str], Replay]) -> plt.Figure:
    """GPU x GPU token messages (dispatch + combine, all layers): one row of panels per
    execution model, one column per placement."""
    names = list(dict.fromkeys(name for name, _ in replays))
    exec_models = list(dict.fromkeys(e for _, e in replays))
    fig, axes = plt.subplots(len(exec_models), len(names), squeeze=False,
                             figsize=(3.0 * len(names) + 1, 3.0 * len(exec_models)))
    top = max(float(r.traffic.sum(axis=0).max()) for r in replays.values()) or 1.0
    for (name, exec_model), result in replays.items():
        ax = axes[exec_models.index(exec_model), names.index(name)]
        image = ax.imshow(result.traffic.sum(axis=0), cmap="viridis", vmin=0, vmax=top)
        ax.set_title(f"{name} ({exec_model})\ncross-node {result.share_cross_node:.0%}",
                     fontsize=9)
        ax.set_xlabel("to GPU", fontsize=8)
        ax.set_ylabel("from GPU", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="token messages")
    return fig


def transition_figure(transitions: np.ndarray, layer: int) -> plt.Figure:
    """Heatmap of ``transitions [E, E]`` (expert in ``layer`` -> expert in ``layer + 1``),
    each row divided by its sum."""
    rows = transitions.sum(axis=1, keepdims=True)
    share = np.divide(transitions, rows, out=np.zeros(transitions.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    image = ax.imshow(share, cmap="Blues", vmin=0)
    ax.set_title(f"expert transitions, layer {layer} -> {layer + 1}", fontsize=10)
    ax.set_xlabel(f"expert in layer {layer + 1}")
    ax.set_ylabel(f"expert in layer {layer}")
    fig.colorbar(image, ax=ax, label="share of the row")
    return fig


def write_report(
    out_dir: str | os.PathLike,
    rows: list[dict],
    replays: dict[tuple[str, str], Replay],
    transitions: np.ndarray,
    transition_layer: int,
    header: dict,
) -> Path:
    """Write ``index.html`` and the figures' PNGs into ``out_dir``; return the page's path.

    Args:
        rows: the comparison (``moetuner.evaluate.compare``).
        replays: (placement, execution model) -> replay, ``linear`` first.
        transitions: ``[E, E]`` transition counts from ``transition_layer`` to the next.
        header: what was evaluated (trace, selection, tokens, model, cluster, note).
    """
    out_dir = Path(out_dir)
    first_exec = next(iter(replays))[1]
    figures = {
        "load.png": load_figure({name: r for (name, e), r in replays.items() if e == first_exec}),
        "traffic.png": traffic_figure(replays),
        "transitions.png": transition_figure(transitions, transition_layer),
    }
    images = {}
    for name, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        images[name] = buffer.getvalue()
    page = _html(rows, images, header, first_exec).encode()
    # All files or none: a failed write leaves no PNG without its page.
    write_together({out_dir / name: lambda handle, data=data: handle.write(data)
                    for name, data in {**images, "index.html": page}.items()}, binary=True)
    return out_dir / "index.html"


def _cell(row: dict, key: str, fmt: str) -> str:
    if key not in row:  # the online columns of a static placement
        return ""
    if fmt == "ms":
        return f"{row[key] * 1e3:.3f}"
    return fmt.format(row[key])


def _html(rows: list[dict], images: dict[str, bytes], header: dict, first_exec: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in TABLE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row, key, fmt))}</td>"
                         for key, _, fmt in TABLE_COLUMNS) + "</tr>"
        for row in rows)
    cluster = header["cluster"]
    captions = {
        "load.png": f"Per-layer GPU load relative to the mean ({first_exec} model); linear is "
                    "the placement engines use today.",
        "traffic.png": "GPU x GPU token messages (dispatch and combine) summed over layers.",
        "transitions.png": "Where the trace's tokens go from one layer's experts to the next's.",
    }
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(data).decode()}" '
        f'alt="{name}"><figcaption>{html.escape(captions[name])} '
        f'(<a href="{name}">{name}</a>)</figcaption></figure>'
        for name, data in images.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moetuner evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1150px; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #bbb; padding: 4px 8px; text-align: right; }}
th {{ background: #eee; }} td:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
.note {{ color: #a33; }}
</style></head><body>
<h1>moetuner evaluation</h1>
<h2>{html.escape(header.get("title", "MoE layers on the evaluation trace"))}</h2>
<p>{header["tokens"]} tokens of <code>{html.escape(str(header["trace"]))}</code>
({html.escape(str(header["selection"]))}); model {html.escape(header["model"])};
{cluster["num_gpus"]} x {html.escape(cluster["gpu"]["name"])} GPUs in {cluster["num_nodes"]}
node(s); steps: {html.escape(str(header.get("batching", "")))}.</p>
<p class="note">MoE times are {html.escape(MODEL_NOTE)}.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{figures}
</body></html>
"""
