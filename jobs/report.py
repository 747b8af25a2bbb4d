"""A sweep's verdict: which variants meet the quality budget, the Pareto fronts, the choice, report.md and
pareto.png. Pure functions over the results table (a list of row dicts), so they test without Ray; and
results.parquet, where that table is kept."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import storage

CAUSAL_BUDGET_KEYS = {"max_ppl_increase", "min_top1_agreement", "max_kl", "min_greedy_agreement"}
ENCODER_BUDGET_KEYS = {"min_cosine", "min_neighbour_overlap"}
OBJECTIVES = ("smallest", "fastest", "fastest_under_size")
_SIZE = re.compile(r"^\s*([\d.]+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_size(value) -> int:
    """100MB / '1.5 GB' / 12345 -> bytes."""
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"size {value!r}: expected a number of bytes or e.g. '100MB', '1.5GB'")
    return int(float(m[1]) * _UNITS[(m[2] or "B").upper()])


def check_budget(budget: dict, kind: str) -> dict:
    allowed = CAUSAL_BUDGET_KEYS if kind == "causal" else ENCODER_BUDGET_KEYS
    for key, value in budget.items():
        if key not in allowed:
            raise ValueError(f"budget key {key!r} is not known for a {kind} model; allowed: {sorted(allowed)}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"budget {key}={value!r}: expected a number")
    return budget


def check_objective(objective) -> tuple[str, int | None]:
    """'smallest' | 'fastest' | {'fastest_under_size': '100MB'} (or 'fastest_under_size: 100MB')."""
    if isinstance(objective, dict) and len(objective) == 1:
        (name, arg), = objective.items()
    elif isinstance(objective, str) and ":" in objective:
        name, arg = (p.strip() for p in objective.split(":", 1))
    else:
        name, arg = objective, None
    if name not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {list(OBJECTIVES)} (fastest_under_size: SIZE)")
    if name == "fastest_under_size":
        if arg is None:
            raise ValueError("objective fastest_under_size needs a size, e.g. {fastest_under_size: 100MB}")
        return name, parse_size(arg)
    return name, None


ENGINE_NAMES = {"raypress": "raypress's engine", "vllm": "vLLM"}


def speed_key(kind: str) -> str:
    return "decode_tokens_per_s_b1" if kind == "causal" else "sentences_per_s"


def quality_key(kind: str) -> str:
    return "ppl" if kind == "causal" else "cosine_to_base"


def failures(row: dict, base: dict, budget: dict) -> list[str]:
    """The budget lines a finished row misses (empty: it passes)."""
    if row.get("error"):
        return ["failed"]
    out = [f"cannot run on {row.get('speed_engine')}: {row['speed_error']}"] if row.get("speed_error") else []
    for key, limit in budget.items():
        if key == "max_ppl_increase":
            value = row["ppl"] / base["ppl"] - 1
            ok = value <= limit
        else:
            metric = {"min_top1_agreement": "top1_agreement", "max_kl": "kl_to_base",
                      "min_greedy_agreement": "greedy_agreement", "min_cosine": "cosine_to_base",
                      "min_neighbour_overlap": "neighbour_overlap"}[key]
            value = row.get(metric)
            ok = value is not None and (value <= limit if key.startswith("max") else value >= limit)
        if not ok:
            out.append(f"{key} {value:.4g} vs {limit}" if isinstance(value, float) else f"{key} missing")
    return out


def sort_key(objective: tuple[str, int | None], kind: str):
    name, _ = objective
    if name == "smallest":
        return lambda r: (r.get("artifact_bytes") or math.inf, -(r.get(speed_key(kind)) or 0))
    return lambda r: (-(r.get(speed_key(kind)) or 0), r.get("artifact_bytes") or math.inf)


def choose(rows: list[dict], base: dict, budget: dict, objective, kind: str) -> dict | None:
    """Best row by the objective among compressed variants within budget (and under the size cap), or None."""
    name, size_cap = objective
    candidates = [r for r in rows if r["spec"] != "base" and not failures(r, base, budget)]
    if size_cap is not None:
        candidates = [r for r in candidates if (r.get("artifact_bytes") or math.inf) <= size_cap]
    return min(candidates, key=sort_key(objective, kind)) if candidates else None


def pareto_front(rows: list[dict], x: str, y: str, higher_y_better: bool, lower_x_better: bool) -> list[dict]:
    """Rows not dominated on (x, y)."""
    pts = [r for r in rows if not r.get("error") and r.get(x) is not None and r.get(y) is not None]

    def better_eq(a, b):
        bx = a[x] <= b[x] if lower_x_better else a[x] >= b[x]
        by = a[y] >= b[y] if higher_y_better else a[y] <= b[y]
        return bx and by

    return [r for r in pts if not any(better_eq(o, r) and (o[x], o[y]) != (r[x], r[y]) for o in pts)]


def write_report(out: Path, rows: list[dict], base: dict, budget: dict, objective, kind: str, model: str,
                 chosen: dict | None) -> Path:
    ordered = [base] + sorted([r for r in rows if r is not base], key=sort_key(objective, kind))
    q, s = quality_key(kind), speed_key(kind)
    lines = [f"# Sweep of {model}", ""]
    if model == "smollm2-135m":
        lines += ["smollm2-135m ships as a 4-bit GGUF (Q4_1): its base is that checkpoint dequantized to float32, "
                  "so 4-bit variants re-quantize an already 4-bit model.", ""]
    lines += [f"Budget: {budget or 'none'}; objective: {_objective_text(objective)}.", ""]
    measured = sorted({(r["speed_engine"], r.get("speed_device") or "?") for r in rows if r.get("speed_engine")})
    if measured:
        lines += ["Speed measured on " + "; ".join(f"{ENGINE_NAMES.get(e, e)}, {d}" for e, d in measured) + ".", ""]
    if chosen:
        lines += [f"**Chosen: `{_name(chosen)}`** ({_mb(chosen.get('artifact_bytes'))}, {q} {chosen.get(q, 0):.4g}"
                  f", {s} {chosen.get(s) or 0:.1f}) -> `chosen/`, served by `serve run serve.yaml`.", ""]
    else:
        lines += ["**No variant meets the budget.** The closest ones are at the top of the table below "
                  "(fewest budget lines missed). No `chosen/` was written.", ""]
        ordered = [base] + sorted([r for r in rows if r is not base], key=lambda r: len(failures(r, base, budget)))
    cols = ["spec", "verdict", q, "kl_to_base" if kind == "causal" else "neighbour_overlap",
            "top1_agreement" if kind == "causal" else "cosine_min", "artifact_bytes", s, "seconds"]
    lines += ["| " + " | ".join(cols + ["size x base", "speed x base"]) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in ordered:
        miss = failures(r, base, budget) if r is not base else []
        verdict = "base" if r is base else ("error: " + str(r["error"])[:60] if r.get("error") else
                                            ("pass" if not miss else "fail: " + "; ".join(miss)))
        cells = [_name(r), verdict] + [_cell(r.get(c)) for c in cols[2:]]
        cells += [_ratio(r.get("artifact_bytes"), base.get("artifact_bytes")), _ratio(r.get(s), base.get(s))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![Pareto fronts](pareto.png)", ""]
    for r in ordered:
        if layer_formats(r):
            lines += [f"### `{_name(r)}`: each layer's format", ""] + layer_table(layer_formats(r)) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def layer_formats(row: dict) -> dict[str, str] | None:
    """A mixed-precision row's format per layer (from its notes), or None for a row with one format throughout."""
    steps = _notes(row).values()
    return next((step["layers"] for step in steps if isinstance(step, dict) and step.get("layers")), None)


def layer_table(layers: dict[str, str]) -> list[str]:
    """A markdown table of a mixed variant's formats: a row per run of identical transformer blocks, a column per
    module of a block; layers outside the blocks (embeddings, head) in a line under it."""
    blocks: dict[int, dict[str, str]] = {}
    other = {}
    for name, fmt in layers.items():
        m = re.fullmatch(r".*?\.(\d+)\.(.+)", name)
        if m:
            blocks.setdefault(int(m[1]), {})[m[2]] = fmt
        else:
            other[name] = fmt
    modules = list(dict.fromkeys(k for b in blocks.values() for k in b))
    lines = ["| blocks | " + " | ".join(modules) + " |", "|" + "---|" * (len(modules) + 1)] if blocks else []
    runs: list[list] = []  # [first, last, formats] over consecutive blocks with the same formats
    for i in sorted(blocks):
        row = [blocks[i].get(k, "-") for k in modules]
        if runs and runs[-1][1] == i - 1 and runs[-1][2] == row:
            runs[-1][1] = i
        else:
            runs.append([i, i, row])
    lines += [f"| {a if a == b else f'{a}-{b}'} | " + " | ".join(row) + " |" for a, b, row in runs]
    if other:
        lines += ["", "Outside the blocks: " + ", ".join(f"`{n}` {f}" for n, f in other.items()) + "."]
    return lines


def sensitivity_table(rows: list[dict]) -> pa.Table | None:
    """The per-layer sensitivity each trial that chose formats per layer measured (predicted KL of each layer in
    each format it scored), as a table of (variant, layer, format, predicted_kl); None when no trial measured one.
    Trials differ in the formats they score and in their base (``smooth-`` variants score the smoothed model)."""
    table = [{"variant": _name(r), "layer": layer, "format": fmt, "predicted_kl": score}
             for r in rows for step in _notes(r).values() if isinstance(step, dict) and step.get("sensitivity")
             for layer, by in step["sensitivity"].items() for fmt, score in by.items()]
    return pa.Table.from_pylist(table) if table else None


def plot_pareto(out: Path, rows: list[dict], kind: str, chosen: dict | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, s = quality_key(kind), speed_key(kind)
    higher_q = kind != "causal"
    ok = [r for r in rows if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x, xlabel, lower_x in ((axes[0], "artifact_bytes", "artifact size (MB)", True),
                                    (axes[1], s, s.replace("_", " "), False)):
        pts = [r for r in ok if r.get(x) is not None]
        front = pareto_front(pts, x, q, higher_q, lower_x)
        scale = 1e6 if x == "artifact_bytes" else 1
        ax.scatter([r[x] / scale for r in pts], [r[q] for r in pts], color="tab:blue", label="variants")
        front = sorted(front, key=lambda r: r[x])
        ax.plot([r[x] / scale for r in front], [r[q] for r in front], "o--", color="tab:orange", label="Pareto front")
        for r in pts:
            ax.annotate(r["spec"], (r[x] / scale, r[q]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        if chosen and chosen.get(x) is not None:
            ax.scatter([chosen[x] / scale], [chosen[q]], s=250, facecolors="none", edgecolors="red", linewidths=2,
                       label=f"chosen: {chosen['spec']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(q + (" (lower is better, log scale)" if not higher_q else " (higher is better)"))
        if not higher_q:  # perplexities span orders of magnitude: on a linear axis all but the worst lie flat
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("quality vs size and quality vs speed")
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _name(row: dict) -> str:
    """A row's name in the report: its spec, and for a row that stands for a variant it found (``auto``, whose
    notes under its own name give the spec it made), that variant too: "auto: mixed-6.35bit"."""
    made = _notes(row).get(row["spec"])
    return f"{row['spec']}: {made['spec']}" if isinstance(made, dict) and made.get("spec") else row["spec"]


def _notes(row: dict) -> dict:
    try:
        notes = json.loads(row.get("notes") or "{}")
    except (TypeError, ValueError):
        return {}
    return notes if isinstance(notes, dict) else {}


def _objective_text(objective) -> str:
    name, cap = objective
    return f"{name} {_mb(cap)}" if cap else name


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v > 10**5:
        return _mb(v)
    return str(v)


def _ratio(v, b) -> str:
    return f"{v / b:.2f}x" if v and b else "-"


# ---------------------------------------------------------------------------------------------------------------
# results.parquet


RESULT_COLUMNS = {"spec": pa.string(), "error": pa.string(), "fingerprint": pa.string(), "artifact": pa.string(),
                  "artifact_bytes": pa.int64(), "notes": pa.string(), "speed_engine": pa.string(),
                  "speed_device": pa.string(), "speed_error": pa.string()}
"""results.parquet's text and integer columns; every other column (quality metrics, speeds, seconds, finished_at,
base_ppl) holds a number."""


def results_table(rows: list[dict]) -> pa.Table:
    """The rows with a schema of their own, not one guessed from the first row (a failed trial has no metrics)."""
    names = list(RESULT_COLUMNS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in RESULT_COLUMNS]
    return pa.Table.from_pylist(rows, schema=pa.schema([(k, RESULT_COLUMNS.get(k, pa.float64())) for k in names]))


def read_results(out: Path) -> list[dict]:
    file = out / "results.parquet"
    return pq.read_table(file).to_pylist() if file.exists() else []


def write_results(out: Path, rows: list[dict]) -> None:
    """Rewrite results.parquet with every row so far, atomically (temporary file + rename)."""
    storage.write_parquet(*storage.resolve(out / "results.parquet"), results_table(rows))
