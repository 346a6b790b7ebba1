"""``aumai-fedtrain report``: plots of a run in one self-contained HTML file and one PNG.

The plots (matplotlib, the ``report`` extra): training and eval loss per round, eval accuracy,
cumulative bytes each way, participation per node per round (who trained, who was dropped and
the kind of reason, who was benched; past :data:`~aumai_fedtrain.models.MAX_LISTED_NODES`
nodes a per-round count), the round-time breakdown by phase, and the nodes' times. The HTML
embeds each plot as a PNG (``data:`` URI) and lists every drop with its reason.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aumai_fedtrain.models import MAX_LISTED_NODES, PHASES, RoundRecord
from aumai_fedtrain.observability.records import DROP_KINDS, drop_kind, total_bytes
from aumai_fedtrain.observability.status import RunFiles, read_run
from aumai_fedtrain.observability.trackers import require_extra

__all__ = ["PLOTS", "REPORT_HTML", "REPORT_PNG", "write_report"]

REPORT_HTML = "report.html"
REPORT_PNG = "report.png"
MAX_DROP_ROWS = 5000
"""Most drops the HTML lists one per row (the metrics file keeps all)."""

_MIB = 1024**2
_PHASE_COLORS = dict(
    zip(PHASES, ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3"), strict=True)
)
_TRAINED, _BENCHED = "#55a868", "#b0b0b0"
_KIND_COLORS = dict(
    zip(
        DROP_KINDS,
        (
            "#b0b0b0",
            "#e377c2",
            "#d62728",
            "#ff7f0e",
            "#9467bd",
            "#8c564b",
            "#bcbd22",
            "#17becf",
            "#1f77b4",
            "#f2c14e",
            "#7f7f7f",
        ),
        strict=True,
    )
)

Axes = Any  # matplotlib.axes.Axes, imported lazily


def _loss(ax: Axes, records: list[RoundRecord]) -> None:
    rounds = [r.round_id for r in records]
    ax.plot(rounds, [r.avg_loss for r in records], marker="o", label="training loss (nodes)")
    evaluated = [r for r in records if r.eval_loss is not None]
    if evaluated:
        ax.plot(
            [r.round_id for r in evaluated],
            [r.eval_loss for r in evaluated],
            marker="s",
            label="eval loss (global model)",
        )
    ax.set_title("Loss per round")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend()


def _accuracy(ax: Axes, records: list[RoundRecord]) -> None:
    evaluated = [r for r in records if r.eval_accuracy is not None]
    ax.set_title("Eval accuracy of the global model")
    ax.set_xlabel("round")
    if not evaluated:
        _nothing(ax, "no evaluation in this run")
        return
    ax.plot(
        [r.round_id for r in evaluated],
        [100 * (r.eval_accuracy or 0.0) for r in evaluated],
        marker="o",
        color="#2ca02c",
    )
    ax.set_ylabel("accuracy (%)")


def _bytes(ax: Axes, records: list[RoundRecord]) -> None:
    ax.set_title("Cumulative bytes moved")
    ax.set_xlabel("round")
    counted = [r for r in records if r.bytes_to_nodes is not None]
    if not counted:
        _nothing(ax, "the provider reported no bytes")
        return
    rounds = [r.round_id for r in counted]
    ax.plot(
        rounds,
        np.cumsum([r.bytes_to_nodes or 0 for r in counted]) / _MIB,
        marker="o",
        label="to the nodes",
    )
    ax.plot(
        rounds,
        np.cumsum([r.bytes_from_nodes or 0 for r in counted]) / _MIB,
        marker="s",
        label="from the nodes",
    )
    ax.set_ylabel("MiB")
    ax.legend()


def _listed_nodes(records: list[RoundRecord]) -> list[str] | None:
    """Every node seen, when each round lists its nodes by id, else None."""
    if any(r.num_nodes is None or r.num_nodes > MAX_LISTED_NODES for r in records):
        return None
    nodes = {node for r in records for node in [*r.participants, *r.dropped]}
    return sorted(nodes)


def _participation(ax: Axes, records: list[RoundRecord]) -> None:
    ax.set_title("Participation per node (who trained, who was dropped and why)")
    ax.set_xlabel("round")
    nodes = _listed_nodes(records)
    if nodes is None:
        _participation_counts(ax, records)
        return
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    grid = np.ones((len(nodes), len(records), 3))
    row = {node: index for index, node in enumerate(nodes)}
    kinds_seen: set[str] = set()
    for column, record in enumerate(records):
        for node in record.participants:
            grid[row[node], column] = to_rgb(_TRAINED)
        for node, reason in record.dropped.items():
            kind = "benched" if node in record.benched else drop_kind(reason)
            kinds_seen.add(kind)
            grid[row[node], column] = to_rgb(_KIND_COLORS[kind])
    ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        extent=(records[0].round_id - 0.5, records[-1].round_id + 0.5, len(nodes) - 0.5, -0.5),
    )
    if len(nodes) <= 32:
        ax.set_yticks(range(len(nodes)), nodes)
    ax.set_ylabel("node")
    handles = [Patch(color=_TRAINED, label="trained")]
    handles += [
        Patch(color=_KIND_COLORS[k], label=f"dropped: {k}" if k != "benched" else "benched")
        for k in DROP_KINDS
        if k in kinds_seen
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def _participation_counts(ax: Axes, records: list[RoundRecord]) -> None:
    rounds = [r.round_id for r in records]
    counted = np.array([r.num_participants for r in records])
    benched = np.array([len(r.benched) for r in records])
    dropped = np.array([len(r.dropped) for r in records]) - benched
    ax.bar(rounds, counted, color=_TRAINED, label="trained")
    ax.bar(rounds, dropped, bottom=counted, color=_KIND_COLORS["other"], label="dropped")
    ax.bar(rounds, benched, bottom=counted + dropped, color=_BENCHED, label="benched")
    ax.set_ylabel("nodes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def _round_time(ax: Axes, records: list[RoundRecord]) -> None:
    ax.set_title("Coordinator time per round, by phase")
    ax.set_xlabel("round")
    rounds = [r.round_id for r in records]
    bottom = np.zeros(len(records))
    for phase in PHASES:
        seconds = np.array([r.phase_seconds.get(phase, 0.0) for r in records])
        if seconds.any():
            ax.bar(rounds, seconds, bottom=bottom, color=_PHASE_COLORS[phase], label=phase)
            bottom += seconds
    if not bottom.any():
        _nothing(ax, "no phase times recorded")
        return
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")


def _node_time(ax: Axes, records: list[RoundRecord]) -> None:
    timed = [r for r in records if r.node_times is not None]
    kind = timed[-1].node_times.kind if timed and timed[-1].node_times else "answer"
    ax.set_title(f"Node {kind} time per round")
    ax.set_xlabel("round")
    if not timed:
        _nothing(ax, "the provider reported no node times")
        return
    rounds = [r.round_id for r in timed]
    for name, marker in (("p50", "o"), ("p90", "s"), ("max", "^")):
        ax.plot(rounds, [getattr(r.node_times, name) for r in timed], marker=marker, label=name)
    ax.set_ylabel("seconds")
    ax.legend()


def _nothing(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")


PLOTS: tuple[tuple[str, str, Callable[[Axes, list[RoundRecord]], None]], ...] = (
    ("loss", "Training and eval loss per round", _loss),
    ("accuracy", "Eval accuracy per round", _accuracy),
    ("bytes", "Cumulative bytes to and from the nodes", _bytes),
    ("participation", "Participation per node per round", _participation),
    ("round-time", "Round-time breakdown by phase", _round_time),
    ("node-time", "Node times per round", _node_time),
)
"""Every plot of the report: (id, caption, drawing function)."""


def _pyplot() -> Any:
    matplotlib = require_extra("matplotlib", "report")
    matplotlib.use("Agg")
    return require_extra("matplotlib.pyplot", "report")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def _draw(
    ax: Axes, draw: Callable[[Axes, list[RoundRecord]], None], records: list[RoundRecord]
) -> None:
    from matplotlib.ticker import MaxNLocator

    draw(ax, records)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def write_report(path: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.png`` of the run at ``path`` (a checkpoint folder,
    finished or not, or a metrics file) into its folder; returns both paths."""
    run = read_run(path)
    if not run.records:
        from aumai_fedtrain.observability.metrics_file import MetricsFileError

        raise MetricsFileError(f"{str(run.source)!r} holds no completed round yet")
    plt = _pyplot()
    images = {}
    for name, _, draw in PLOTS:
        figure, ax = plt.subplots(figsize=(10, 4.2))
        _draw(ax, draw, run.records)
        images[name] = _png(figure)
        plt.close(figure)
    figure, axes = plt.subplots(3, 2, figsize=(18, 14))
    for ax, (_, _, draw) in zip(axes.flat, PLOTS, strict=True):
        _draw(ax, draw, run.records)
    figure.suptitle(_title(run), fontsize="x-large")
    figure.tight_layout()
    png_path = run.folder / REPORT_PNG
    png_path.write_bytes(_png(figure))
    plt.close(figure)
    html_path = run.folder / REPORT_HTML
    html_path.write_text(_html(run, images), encoding="utf-8")
    return html_path, png_path


def _title(run: RunFiles) -> str:
    last = run.records[-1]
    config = run.checkpoint.config if run.checkpoint else None
    planned = f" of {config.global_rounds}" if config else ""
    name = f"{config.model_name}: " if config else ""
    return f"{name}round {last.round_id}{planned} ({run.source})"


def _html(run: RunFiles, images: dict[str, bytes]) -> str:
    records = run.records
    last = records[-1]
    to_nodes, from_nodes = total_bytes(records)
    drops = sum(len(r.dropped) for r in records)
    summary = [
        ("rounds completed", str(last.round_id)),
        ("last training loss", f"{last.avg_loss:.6f}"),
        ("last eval loss", "-" if last.eval_loss is None else f"{last.eval_loss:.6f}"),
        (
            "last eval accuracy",
            "-" if last.eval_accuracy is None else f"{100 * last.eval_accuracy:.2f}%",
        ),
        ("bytes to the nodes", "-" if to_nodes is None else f"{to_nodes / _MIB:.2f} MiB"),
        ("bytes from the nodes", "-" if from_nodes is None else f"{from_nodes / _MIB:.2f} MiB"),
        ("nodes dropped (node-rounds)", str(drops)),
    ]
    figures = "\n".join(
        f'<figure id="{name}"><img alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(images[name]).decode("ascii")}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption, _ in PLOTS
    )
    rows = [
        (r.round_id, node, "benched" if node in r.benched else drop_kind(reason), reason)
        for r in records
        for node, reason in r.dropped.items()
    ]
    drop_rows = "\n".join(
        f"<tr><td>{round_id}</td><td>{html.escape(node)}</td><td>{kind}</td>"
        f"<td>{html.escape(reason)}</td></tr>"
        for round_id, node, kind, reason in rows[:MAX_DROP_ROWS]
    )
    more = (
        f"<p>... and {len(rows) - MAX_DROP_ROWS} more (see the metrics file).</p>"
        if len(rows) > MAX_DROP_ROWS
        else ""
    )
    drops_html = (
        f"<table><tr><th>round</th><th>node</th><th>kind</th><th>reason</th></tr>\n"
        f"{drop_rows}</table>{more}"
        if rows
        else "<p>No node was dropped or benched.</p>"
    )
    summary_html = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>aumai-fedtrain report: {html.escape(_title(run))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px;
text-align: left; }}
</style></head><body>
<h1>aumai-fedtrain report</h1>
<p>{html.escape(_title(run))}</p>
<table>{summary_html}</table>
{figures}
<h2>Dropped and benched nodes</h2>
{drops_html}
</body></html>
"""
