"""MkDocs hooks of this site (named in ``mkdocs.yml``).

- The "Tuners" section of the navigation lists every page of ``docs/tuners/`` (tuner pages are added by the
  engineers of each tuner, so the section follows the tree instead of a hand-kept list), and any other page not
  named in ``mkdocs.yml`` (``docs/compatibility.md``, ...) is appended to the navigation under its title.
- ``<!-- benchmark: NAME -->`` alone on a line embeds ``benchmarks/results/NAME.json`` (table and chart).
- ``<!-- benchmark-chart: NAME -->`` alone on a line embeds only that file's chart.
- ``<!-- suite: NAME -->`` alone on a line embeds tuner NAME's rows of the benchmark suite
  (``benchmarks/results/suite.json``: ours through both APIs, ms-swift, the frozen base, LoRA on the same model;
  a memory chart where the suite measured scaling).
- An upper-case placeholder left in prose (``MEASURED_TABLE``) is a warning, so the strict build fails.
- ``guides/benchmarks.md`` gets its figures from ``benchmarks/results/*.json``: a table per file, and a chart
  (SVG, generated at build time) where one reads better than the table.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARK_MARKER = "<!-- benchmark-figures -->"
# An unfilled placeholder such as MEASURED_TABLE left in prose (code and HTML comments are not checked).
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}(?:_[A-Z]{2,})+\b")
log = logging.getLogger("mkdocs.hooks.peft_swift_ext")

# Reading order of the tuner pages; pages not named here follow alphabetically.
TUNER_ORDER = ["loraplus", "adapter", "prompt", "side", "restuning", "scedit", "llamapro", "longlora", "neftune"]
# Pages kept outside docs/tuners/ until a tuner page exists: (tuner page names that replace it, page).
FALLBACK_TUNER_PAGES: list[tuple[tuple[str, ...], str]] = []


def tuner_pages(docs_dir: Path) -> list[str]:
    """Docs-relative paths of the tuner pages, in reading order."""
    found = {p.stem: f"tuners/{p.name}" for p in sorted((docs_dir / "tuners").glob("*.md"))}
    for stems, page in FALLBACK_TUNER_PAGES:
        if not any(stem in found for stem in stems) and (docs_dir / page).exists():
            found[stems[0]] = page
    rank = {name: i for i, name in enumerate(TUNER_ORDER)}
    return [found[stem] for stem in sorted(found, key=lambda s: (rank.get(s, len(rank)), s))]


def _nav_pages(entries) -> set[str]:
    pages: set[str] = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages |= _nav_pages(value)
        elif isinstance(value, str):
            pages.add(value)
    return pages


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip().replace("`", "")
    return path.stem.replace("_", " ").capitalize()


def on_config(config):
    """Tuners from docs/tuners/; pages that other work adds (e.g. compatibility.md) appended at the end."""
    docs_dir = Path(config["docs_dir"])
    nav = config["nav"]
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and "Tuners" in entry:
            nav[i] = {"Tuners": tuner_pages(docs_dir)}
    listed = _nav_pages(nav)
    for path in sorted(docs_dir.rglob("*.md")):
        page = path.relative_to(docs_dir).as_posix()
        if page not in listed:
            nav.append({_title(path): page})
    return config


# --- benchmark figures ---------------------------------------------------------------------------------------


def _scalars(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _scalars(value, f"{name}.")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
        elif isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
            rows.append((name, ", ".join(map(str, value))))
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _length_series(data: dict) -> dict[str, dict[int, dict]] | None:
    """``results: {variant: {length: {metric: value}}}`` (the LongLoRA schema), else None."""
    results = data.get("results")
    if not isinstance(results, dict) or not results:
        return None
    series = {}
    for variant, by_length in results.items():
        if not isinstance(by_length, dict) or not all(re.fullmatch(r"\d+", k) for k in by_length):
            return None
        series[variant] = {int(k): v for k, v in by_length.items() if isinstance(v, dict)}
    return series


def _svg(figure) -> str:
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "peft-swift-ext"
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buffer.getvalue()


def _length_chart(name: str, series: dict[str, dict[int, dict]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("peak_mib", "step_seconds") if any(m in v for s in series.values() for v in s.values())]
    if not metrics:
        return None
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for variant, by_length in series.items():
            points = sorted((length, v[metric]) for length, v in by_length.items() if metric in v)
            if points:
                axis.plot(*zip(*points), marker="o", label=variant)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(metric)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(name, y=1.04)
    svg = _svg(figure)
    plt.close(figure)
    return svg


def _peak_bar_chart(name: str, data: dict) -> str | None:
    """A bar per ``*_peak_mib`` figure at the top level (e.g. full logits vs chunked)."""
    peaks = {k.removesuffix("_peak_mib"): v for k, v in data.items() if k.endswith("_peak_mib")}
    if len(peaks) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 2.6))
    axis.barh(list(peaks), list(peaks.values()))
    axis.set_xlabel("peak memory (MiB)")
    axis.set_title(name)
    svg = _svg(figure)
    plt.close(figure)
    return svg


def _ratio_bar_chart(name: str, data: dict) -> str | None:
    """A bar per top-level ``a_vs_b`` ratio, with 1.0 (no change) marked."""
    ratios = {k: v for k, v in data.items() if "_vs_" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(ratios) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 0.5 + 0.45 * len(ratios)))
    axis.barh(list(ratios), list(ratios.values()))
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("ratio (1 = no change)")
    axis.set_title(name)
    svg = _svg(figure)
    plt.close(figure)
    return svg


def _curves(data: dict) -> dict[str, dict[str, list]] | None:
    """``curves: {panel: {variant: [value every curve_every steps]}}`` (the LoRA+ schema), else None."""
    curves = data.get("curves")
    if not isinstance(curves, dict) or not curves:
        return None
    for panel in curves.values():
        if not isinstance(panel, dict) or not all(isinstance(v, list) and v for v in panel.values()):
            return None
        if not all(_is_number(x) for v in panel.values() for x in v):
            return None
    return curves


def _curve_chart(name: str, curves: dict[str, dict[str, list]], every: int) -> str:
    """One panel per key of ``curves`` (e.g. per learning rate), a line per variant, against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.0), squeeze=False, sharey=True)
    for axis, (panel, lines) in zip(axes[0], curves.items()):
        for variant, values in lines.items():
            axis.plot([i * every for i in range(len(values))], values, marker=".", label=variant)
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(name, y=1.04)
    svg = _svg(figure)
    plt.close(figure)
    return svg


CHART_DIR = "guides/charts"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row_table(value: object) -> dict[str, dict] | None:
    """``{row: {metric: number, ...}}`` with at least two rows and a numeric metric, else None."""
    if not isinstance(value, dict) or len(value) < 2:
        return None
    if not all(isinstance(v, dict) and any(_is_number(x) for x in v.values()) for v in value.values()):
        return None
    return value


def _grouped_tables(data: dict) -> dict[str, dict[str, dict]]:
    """Tables found at the top level (``key: {row: {metric}}``) or one level down (``key: {group: {row: ...}}``)."""
    tables: dict[str, dict[str, dict]] = {}
    for key, value in data.items():
        if key == "results" and _length_series(data):
            continue
        if _row_table(value):
            tables[key] = value
        elif isinstance(value, dict) and value and all(_row_table(v) for v in value.values()):
            tables.update({f"{key}.{group}": table for group, table in value.items()})
    return tables


def _memory_metric(table: dict[str, dict]) -> str | None:
    metrics = [m for row in table.values() for m, v in row.items() if "mib" in m and _is_number(v)]
    return metrics[0] if metrics else None


def _tables_chart(name: str, tables: dict[str, dict[str, dict]]) -> str | None:
    """Memory per row, one panel per table, for the tables that report memory (a ``*mib*`` figure)."""
    panels = []
    for title, table in tables.items():
        rows = [r for r, v in table.items() if isinstance(v, dict)]
        metrics = [m for m in dict.fromkeys(m for r in rows for m in table[r]) if "mib" in m]
        metrics = [m for m in metrics if all(_is_number(table[r].get(m)) for r in rows)]
        if metrics:
            panels.append((title, rows, metrics, table))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for axis, (title, rows, metrics, table) in zip(axes[0], panels):
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            axis.bar([i + j * width for i in range(len(rows))], [table[r][metric] for r in rows], width, label=metric)
        axis.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(rows))], rows, fontsize=7)
        axis.set_ylabel("MiB")
        axis.set_title(title, fontsize=8)
        if len(metrics) > 1:
            axis.legend(fontsize=6)
    figure.suptitle(name, y=1.04)
    svg = _svg(figure)
    plt.close(figure)
    return svg


def benchmark_section(path: Path, heading: str = "##") -> tuple[str, str | None]:
    """Markdown for one results file (its chart linked as ``{chart_dir}/<name>.svg``), and the chart's SVG."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{heading} `{path.stem}`\n\nUnreadable: {error}\n", None
    if not isinstance(data, dict):
        return f"{heading} `{path.stem}`\n\nNot a JSON object.\n", None
    lines = [f"{heading} `{path.stem}`", "", f"From `benchmarks/results/{path.name}`.", ""]
    if "command" in data:
        lines += [f"Command: `{data['command']}`", ""]
    series = _length_series(data)
    tables = _grouped_tables(data)
    if series:
        svg = _length_chart(path.stem, series)
    elif _curves(data):
        svg = _curve_chart(path.stem, _curves(data), data.get("curve_every", 1))
    else:
        svg = _tables_chart(path.stem, tables) or _peak_bar_chart(path.stem, data) or _ratio_bar_chart(path.stem, data)
    if svg:
        lines += [f"![{path.stem} chart]({{chart_dir}}/{path.stem}.svg)", ""]
    in_tables = {key.split(".")[0] for key in tables}
    skipped = ("results", "command", "curves")
    rows = _scalars({k: v for k, v in data.items() if k not in skipped and k not in in_tables})
    if rows:
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows]
        lines.append("")
    for title, table in tables.items():
        metrics = list(dict.fromkeys(m for row in table.values() for m, v in row.items() if not isinstance(v, dict)))
        lines += [f"`{title}`:", "", "| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for row, values in table.items():
            cells = " | ".join(_fmt(values.get(m, "")) for m in metrics)
            lines.append(f"| {row} | {cells} |")
        lines.append("")
    if series:
        metrics = sorted({m for s in series.values() for v in s.values() for m in v})
        lengths = sorted({n for s in series.values() for n in s})
        lines += ["| variant | length | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for variant, by_length in series.items():
            for n in lengths:
                if n in by_length:
                    cells = " | ".join(_fmt(by_length[n].get(m, "")) for m in metrics)
                    lines.append(f"| {variant} | {n} | {cells} |")
        lines.append("")
    return "\n".join(lines), svg


def benchmark_sections(results_dir: Path = RESULTS) -> tuple[dict[str, str], dict[str, str]]:
    """``{name: markdown}`` for every results file, and the charts they link (``{docs path: svg}``)."""
    sections: dict[str, str] = {}
    charts: dict[str, str] = {}
    for path in sorted(results_dir.glob("*.json")):
        sections[path.stem], svg = benchmark_section(path)
        if svg:
            charts[f"{CHART_DIR}/{path.stem}.svg"] = svg
    return sections, charts


# --- one tuner's rows of the benchmark suite (benchmarks/results/suite.json) --------------------------------------

SUITE_SIDES = {
    "base": "frozen base model",
    "peft": "ours, `get_peft_model`",
    "swift_api": "ours, `Swift.prepare_model`",
    "ms_swift": "ms-swift",
}
# <!-- suite: NAME --> on a page embeds tuner NAME's rows of benchmarks/results/suite.json.
RESULTS_IMAGE = re.compile(r"(?:\.\./)+benchmarks/results/([\w.-]+\.png)")
# <!-- benchmark-chart: NAME --> embeds only the chart of benchmarks/results/NAME.json (for pages that quote the
# figures in their own table).
CHART_EMBED = re.compile(r"^[ \t]*<!--\s*benchmark-chart:\s*([\w.-]+)\s*-->[ \t]*$", re.MULTILINE)
SUITE_EMBED = re.compile(r"^[ \t]*<!--\s*suite:\s*([\w.-]+)\s*-->[ \t]*$", re.MULTILINE)


def _ms(seconds: object) -> str:
    return f"{1000 * seconds:.1f}" if _is_number(seconds) else "–"


def _num(value: object, digits: str = ".2f") -> str:
    return format(value, digits) if _is_number(value) else "–"


def suite_section(name: str, suite: dict) -> str | None:
    """Markdown for one tuner's rows of the suite (and LoRA's on the same model), or None if it has none."""
    tuners = suite.get("tuners", {})
    rows = tuners.get(name)
    if not isinstance(rows, dict):
        return None
    notes = suite.get("tuner_notes", {}).get(name, {})
    family = notes.get("family")
    model = suite.get("models", {}).get(family, family or "?")
    machine = suite.get("machine", {})
    versions = suite.get("versions", {}).get("ours", {})
    lines = [
        f"Model: {model}. Setup: {notes.get('note', '')}. One training step (forward, backward, AdamW), median of "
        f"{suite.get('repeats', '?')} interleaved rounds on {machine.get('cores', '?')} CPU cores "
        f"(torch {versions.get('torch', '?')}, peft {versions.get('peft', '?')}); ×base is the step time over "
        "the frozen base model's forward and backward. From `benchmarks/results/suite.json` "
        "(`python benchmarks/run_suite.py`, see [Benchmarks](../benchmarks.md)).",
        "",
        "| | trainable params | step (ms) | ×base | peak step MiB | save / load (ms) | checkpoint KiB |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(label: str, values: dict) -> str:
        trainable = values.get("trainable")
        save_load = (
            f"{_ms(values['save_s'])} / {_ms(values.get('load_s'))}" if _is_number(values.get("save_s")) else "–"
        )
        return (
            f"| {label} | {trainable:,} | {_ms(values.get('step_s'))} | {_num(values.get('step_vs_base'))} | "
            f"{_num(values.get('peak_mib'), '.1f')} | {save_load} | {_num(values.get('checkpoint_kib'), '.0f')} |"
        )

    for side, label in SUITE_SIDES.items():
        if isinstance(rows.get(side), dict):
            lines.append(row(label, rows[side]))
    lora = tuners.get("lora", {}).get("peft")
    if name != "lora" and family == tuners_family(suite, "lora") and isinstance(lora, dict):
        lines.append(row("PEFT LoRA r=8 on q_proj, v_proj (same model, for comparison)", lora))
    lines.append("")
    merged = rows.get("merged")
    if isinstance(merged, dict) and _is_number(merged.get("vs_base")):
        lines += [
            f"Forward of the merged model: {_ms(merged.get('forward_s'))} ms, "
            f"{merged['vs_base']:.2f}× the base model's forward.",
            "",
        ]
    scaling = suite.get("scaling", {}).get(name)
    if isinstance(scaling, dict):
        lines += [
            "Scaling (ours through `get_peft_model`):",
            "",
            f"![{name} scaling chart]({{chart_dir}}/suite_{name}.svg)",
            "",
            "| axis | x | step (ms) | ×base | peak step MiB | base peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for axis, points in scaling.items():
            for point in points:
                lines.append(
                    f"| {axis} | {point.get('x')} | {_ms(point.get('step_s'))} | {_num(point.get('step_vs_base'))} | "
                    f"{_num(point.get('peak_mib'), '.1f')} | {_num(point.get('base_peak_mib'), '.1f')} |"
                )
        lines.append("")
    return "\n".join(lines)


def tuners_family(suite: dict, name: str) -> str | None:
    """The model family (``llama``, ``bert``...) a tuner was measured on in the suite."""
    return suite.get("tuner_notes", {}).get(name, {}).get("family")


def suite_scaling_chart(name: str, scaling: dict) -> str | None:
    """Peak memory and step time against sequence length and width: the tuner vs the frozen base."""
    axes_data = {axis: points for axis, points in scaling.items() if isinstance(points, list) and points}
    if not axes_data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(axes_data), figsize=(4.2 * len(axes_data), 3.0), squeeze=False)
    for axis, (axis_name, points) in zip(axes[0], axes_data.items()):
        xs = [p["x"] for p in points]
        axis.plot(xs, [p["peak_mib"] for p in points], marker="o", label=f"{name} peak MiB")
        axis.plot(xs, [p["base_peak_mib"] for p in points], marker="o", linestyle="--", label="base peak MiB")
        axis.set_xlabel(axis_name)
        axis.set_ylabel("MiB")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{name}: peak training-step memory", y=1.04)
    svg = _svg(figure)
    plt.close(figure)
    return svg


_sections: dict[str, str] = {}
_charts: set[str] = set()
_suite: dict = {}
# <!-- benchmark: NAME --> on any page embeds benchmarks/results/NAME.json (table, and chart where there is one).
EMBED = re.compile(r"^[ \t]*<!--\s*benchmark:\s*([\w.-]+)\s*-->[ \t]*$", re.MULTILINE)


def on_files(files, config):
    sections, charts = benchmark_sections()
    _sections.clear()
    _sections.update(sections)
    _charts.clear()
    _charts.update(Path(uri).stem for uri in charts)
    _suite.clear()
    suite_path = RESULTS / "suite.json"
    if suite_path.exists():
        _suite.update(json.loads(suite_path.read_text()))
    # images the suite writes next to its results (linked from docs/benchmarks.md as ../benchmarks/results/...)
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{CHART_DIR}/results/{image.name}", content=image.read_bytes()))
    for name, scaling in _suite.get("scaling", {}).items():
        svg = suite_scaling_chart(name, scaling) if isinstance(scaling, dict) else None
        if svg:
            charts[f"{CHART_DIR}/suite_{name}.svg"] = svg
    for src_uri, svg in charts.items():
        files.append(File.generated(config, src_uri, content=svg))
    return files


def placeholders(markdown: str) -> list[str]:
    """Upper-case placeholders (``SOME_FIGURE``) in the prose of a page."""
    prose = re.sub(r"^[ \t]*(```+|~~~+).*?^[ \t]*\1[ \t]*$", "", markdown, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    return PLACEHOLDER.findall(prose)


def _to_root(page_uri: str) -> str:
    return "../" * page_uri.count("/")


def _chart_dir_for(page_uri: str) -> str:
    depth = page_uri.count("/")
    return "/".join([".."] * depth + [CHART_DIR]) if depth else CHART_DIR


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri
    for name in placeholders(markdown):
        log.warning("%s: unfilled placeholder %s", uri, name)
    chart_dir = _chart_dir_for(uri)

    def embed(match: re.Match) -> str:
        name = match.group(1)
        if name not in _sections:
            log.warning("%s: no benchmarks/results/%s.json to embed", uri, name)
            return ""
        return _sections[name].replace("{chart_dir}", chart_dir).replace("## `", "#### `", 1)

    markdown = EMBED.sub(embed, markdown)

    def embed_suite(match: re.Match) -> str:
        section = suite_section(match.group(1), _suite)
        if section is None:
            log.warning("%s: benchmarks/results/suite.json has no rows for %s", uri, match.group(1))
            return ""
        return section.replace("{chart_dir}", chart_dir).replace(
            "](../benchmarks.md)", f"]({_to_root(uri)}benchmarks.md)"
        )

    markdown = SUITE_EMBED.sub(embed_suite, markdown)

    def embed_chart(match: re.Match) -> str:
        name = match.group(1)
        if name not in _charts:
            log.warning("%s: benchmarks/results/%s.json has no chart to embed", uri, name)
            return ""
        return f"![{name} chart]({chart_dir}/{name}.svg)"

    markdown = CHART_EMBED.sub(embed_chart, markdown)
    # ../benchmarks/results/NAME.png (right when the page is read on GitHub) -> the copy in the site
    markdown = RESULTS_IMAGE.sub(lambda m: f"{chart_dir}/results/{m.group(1)}", markdown)
    if BENCHMARK_MARKER in markdown:
        every = "\n".join(_sections.values()) or "No results yet: `benchmarks/results/` is empty.\n"
        markdown = markdown.replace(BENCHMARK_MARKER, every.replace("{chart_dir}", chart_dir))
    return markdown
