"""What every evaluation report writes its numbers and figures with: Markdown cells and tables,
confidence-interval text, and matplotlib figures rendered to PNG bytes (segmentation, detection
and classification reports alike)."""

from __future__ import annotations

import math

from mammocad.evaluation.bootstrap import ConfidenceInterval


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def ci_text(ci: ConfidenceInterval | None) -> str:
    """``[low, high]``, with a note when the interval is degenerate or some resamples left it undefined."""
    if ci is None:
        return "—"
    text = f"[{fmt(ci.low)}, {fmt(ci.high)}]"
    if ci.degenerate:
        return text + " (degenerate: 1 patient)"
    return text + (f" ({ci.n_valid}/{ci.n_boot} resamples defined)" if ci.n_valid < ci.n_boot else "")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def new_figure():
    """A 6 x 4.5 in figure on its own Agg canvas: matplotlib's object API, no global backend touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib's import takes seconds
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
