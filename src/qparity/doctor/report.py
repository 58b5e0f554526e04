"""The doctor's report: plain records (`Cause`, `LayerResult`, `DoctorReport`) and their three renderings,
a rich terminal report (`print(report)`), JSON, and a self-contained HTML page with inline SVG charts."""
from __future__ import annotations

import dataclasses
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

KINDS = ("qparams_mismatch", "weight_grid", "bn_folding", "bias_quantization", "requantization",
         "float_accumulation", "saturation", "observer_not_frozen")


@dataclass
class Cause:
    """One reason codes differ: `kind` (one of KINDS), the layer (module path), one or two sentences with the
    numbers, the numbers themselves, and what to change."""
    kind: str
    layer: str
    explanation: str
    evidence: Dict[str, Any]
    fix: str
    affected: int = 0  # output codes of `layer` this cause moves on the example inputs


@dataclass
class LayerResult:
    """One quantized layer's output codes: fake-quant (expected) against converted (actual)."""
    name: str
    module: str
    mismatched: int
    total: int
    max_diff: int
    first_index: Optional[List[int]]
    expected: Optional[int]
    actual: Optional[int]
    diff_histogram: Dict[int, int] = field(default_factory=dict)  # actual - expected -> count
    stages: Dict[str, int] = field(default_factory=dict)  # conv/linear: codes each step moves (see causes.py)
    unexplained: Optional[int] = None


@dataclass
class DoctorReport:
    """What `qparity.doctor` found. `ok` when the final outputs and every layer's codes agree."""
    ok: bool
    mismatched: int
    total: int
    max_abs_diff: float
    engine: str
    flow: str
    layers: List[LayerResult]
    first_divergence: Optional[str]
    causes: List[Cause]
    notes: List[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.ok:
            return (f"OK: the converted model reproduces the fake-quant model exactly ({self.total} output values, "
                    f"{len(self.layers)} layers compared, engine {self.engine})"
                    + (f"; but see {len(self.causes)} warning(s)" if self.causes else ""))
        where = f"; first divergence at {self.first_divergence}" if self.first_divergence else ""
        if not self.causes:
            return (f"MISMATCH: {self.mismatched} of {self.total} output values differ{where}; no cause found "
                    "(the engine's arithmetic is not explained here: please report it)")
        main = self.causes[0]
        unexplained = sum(layer.unexplained or 0 for layer in self.layers)
        tail = (f" {unexplained} layer code(s) remain unexplained." if unexplained else
                " Every differing code of the conv/linear layers is accounted for.")
        return (f"MISMATCH: {self.mismatched} of {self.total} output values differ{where}; main cause: "
                f"{main.kind} in {main.layer}.{tail}")

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        return data

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_html(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(render_html(self), encoding="utf-8")
        return path

    def __rich__(self) -> Group:
        return render_rich(self)

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=120, color_system=None, highlight=False)
        console.print(self)
        return console.file.getvalue()


def _first(layer: LayerResult) -> str:
    if layer.first_index is None:
        return ""
    return f"{layer.first_index}: {layer.expected} -> {layer.actual}"


def render_rich(report: DoctorReport) -> Group:
    parts: List[Any] = [Text(report.verdict, style="bold green" if report.ok else "bold red")]
    if report.causes:
        causes = Table(title="causes, most output codes moved first", show_lines=True)
        for column in ("#", "kind", "layer", "codes moved", "what happened", "fix"):
            causes.add_column(column, overflow="fold")
        for i, cause in enumerate(report.causes, 1):
            causes.add_row(str(i), cause.kind, cause.layer, str(cause.affected), cause.explanation, cause.fix)
        parts.append(causes)
    layers = Table(title=f"layers in execution order ({report.flow} flow, engine {report.engine}; "
                         "expected = fake-quant codes, actual = converted)")
    for column in ("layer", "module", "mismatched", "total", "max diff", "first mismatch: expected -> actual",
                   "unexplained"):
        layers.add_column(column, justify="left" if column in ("layer", "module", "first mismatch: expected -> actual")
                          else "right")
    for layer in report.layers:
        mark = " <- first divergence" if layer.name == report.first_divergence else ""
        layers.add_row(layer.name + mark, layer.module, str(layer.mismatched), str(layer.total), str(layer.max_diff),
                       _first(layer), "" if layer.unexplained is None else str(layer.unexplained))
    parts.append(layers)
    parts.append(Text(f"final output: {report.mismatched} of {report.total} values differ "
                      f"(largest difference {report.max_abs_diff:.6g})"))
    parts.extend(Text(f"note: {note}") for note in report.notes)
    return Group(*parts)


def _bar_chart(layers: List[LayerResult]) -> str:
    """Per-layer share of mismatched codes, one horizontal bar per layer, in execution order."""
    row, label_w, bar_w = 26, 220, 420
    height = row * max(len(layers), 1) + 30
    items = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 160}" height="{height}" '
             'role="img" aria-label="mismatched codes per layer">']
    for i, layer in enumerate(layers):
        y = 10 + i * row
        share = layer.mismatched / layer.total if layer.total else 0.0
        colour = "#c0392b" if layer.mismatched else "#27ae60"
        items.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{html.escape(layer.name)}</text>')
        items.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="{row - 8}" fill="#eee"/>')
        items.append(f'<rect x="{label_w}" y="{y}" width="{max(share * bar_w, 1 if layer.mismatched else 0):.1f}" '
                     f'height="{row - 8}" fill="{colour}"/>')
        items.append(f'<text x="{label_w + bar_w + 8}" y="{y + 15}">{layer.mismatched} / {layer.total} '
                     f'({share:.1%})</text>')
    items.append("</svg>")
    return "\n".join(items)


def _histogram(layers: List[LayerResult]) -> str:
    """Counts of (actual - expected) code differences over every layer, zero excluded (it is stated above)."""
    counts: Dict[int, int] = {}
    for layer in layers:
        for diff, n in layer.diff_histogram.items():
            if diff:
                counts[diff] = counts.get(diff, 0) + n
    if not counts:
        return "<p>No code differs in any layer.</p>"
    diffs = list(range(min(counts), max(counts) + 1))
    if len(diffs) > 64:
        diffs = sorted(counts)
    top = max(counts.values())
    bar, plot_h, top_margin = 28, 180, 20
    width = max(60 + bar * len(diffs), 320)
    items = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{plot_h + 60 + top_margin}" '
             f'viewBox="0 {-top_margin} {width} {plot_h + 60 + top_margin}" role="img" '
             'aria-label="histogram of code differences">',
             f'<line x1="40" y1="{plot_h + 10}" x2="{width}" y2="{plot_h + 10}" stroke="#333"/>']
    for i, diff in enumerate(diffs):
        n = counts.get(diff, 0)
        h = plot_h * n / top
        x = 44 + i * bar
        items.append(f'<rect x="{x}" y="{plot_h + 10 - h:.1f}" width="{bar - 6}" height="{h:.1f}" fill="#2980b9">'
                     f'<title>{diff:+d}: {n} codes</title></rect>')
        items.append(f'<text x="{x + (bar - 6) / 2}" y="{plot_h + 28}" text-anchor="middle">{diff:+d}</text>')
        if n:
            items.append(f'<text x="{x + (bar - 6) / 2}" y="{plot_h + 6 - h:.1f}" text-anchor="middle" '
                         f'font-size="10">{n}</text>')
    items.append(f'<text x="{width / 2}" y="{plot_h + 50}" text-anchor="middle">actual - expected (codes)</text>')
    items.append("</svg>")
    return "\n".join(items)


def _table(headers: List[str], rows: List[List[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: DoctorReport) -> str:
    causes = _table(["#", "kind", "layer", "codes moved", "what happened", "fix"],
                    [[i, c.kind, c.layer, c.affected, c.explanation, c.fix] for i, c in enumerate(report.causes, 1)]) \
        if report.causes else "<p>No cause found.</p>"
    layers = _table(["layer", "module", "mismatched", "total", "max diff", "first mismatch: expected -> actual",
                     "unexplained"],
                    [[l.name + (" (first divergence)" if l.name == report.first_divergence else ""), l.module,
                      l.mismatched, l.total, l.max_diff, _first(l), "" if l.unexplained is None else l.unexplained]
                     for l in report.layers])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    status = "ok" if report.ok else "bad"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qparity doctor</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
.ok {{ color: #1e8449; }} .bad {{ color: #c0392b; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; max-width: 40em; }}
svg text {{ font-family: sans-serif; font-size: 12px; }}
</style></head><body>
<h1>qparity doctor</h1>
<p class="{status}"><strong>{html.escape(report.verdict)}</strong></p>
<p>{report.flow} flow, engine {html.escape(report.engine)}; final output: {report.mismatched} of {report.total} values
differ (largest difference {report.max_abs_diff:.6g}).</p>
<h2>Causes</h2>
{causes}
<h2>Mismatched codes per layer</h2>
{_bar_chart(report.layers)}
<h2>Code differences (actual - expected), all layers</h2>
{_histogram(report.layers)}
<h2>Layers</h2>
{layers}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""
