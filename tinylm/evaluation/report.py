"""How evaluate.py shows its numbers: the side-by-side table for the terminal, and the HTML report, one
self-contained page (inline CSS and SVG, no script, nothing fetched).

    text = table(report)                  # report: what evaluate.py writes with --json
    html = render(report)

Both show the same rows (table_rows). The page has them as an HTML table, a bar chart per probe category and for
the cloze with each bar's 95% interval as a whisker, every probe with each model's greedy completion marked right
or wrong by the model's scores, and held-out stories token by token for each model side by side: a token's colour
is its loss, and hovering shows the model's five most likely tokens at that point.
"""

import html

from tinylm.wording import plural

BAR_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table.numbers { border-collapse: collapse; font-size: 13px; }
table.numbers td, table.numbers th { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
table.numbers td:first-child, table.numbers th:first-child { text-align: left; }
table.numbers td.chance { color: #777; }
table.probes { border-collapse: collapse; font-size: 12px; width: 100%; }
table.probes td, table.probes th { border-bottom: 1px solid #ddd; padding: 3px 6px; vertical-align: top; text-align: left; }
.right { color: #2a7a2a; } .wrong { color: #a33; }
.stories { display: grid; gap: 1em; }
.story { white-space: pre-wrap; font: 13px/1.7 ui-monospace, monospace; border: 1px solid #ddd; padding: .6em; }
.story span { border-radius: 2px; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
table.heads { border-collapse: collapse; font-size: 12px; }
table.heads td, table.heads th { border: 1px solid #ccc; padding: 2px 6px; text-align: center; }
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def loss_color(loss: float) -> str:
    """White at 0 nats, through yellow, to red at 8 nats and beyond."""
    x = max(0.0, min(loss / 8.0, 1.0))
    green = int(255 - 200 * x)
    blue = int(255 - 255 * min(1.0, 2 * x))
    return f"rgb(255,{green},{blue})"


def bar_chart(title: str, values: dict, chance: float) -> str:
    """An inline SVG of one accuracy per model, values {model: (acc, (low, high))}: a bar, its 95% interval as a
    whisker, and chance as a dashed line."""
    width, height, left, bar = 340, 40 + 26 * len(values), 150, 18
    scale = width - left - 50
    parts = [f'<svg width="{width}" height="{height}" role="img">',
             f'<text x="0" y="14" font-weight="bold" font-size="13">{esc(title)}</text>']
    for i, (name, (acc, (low, high))) in enumerate(values.items()):
        y = 26 + 26 * i
        parts.append(f'<text x="0" y="{y + 13}" font-size="11">{esc(name[-24:])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{scale * acc:.1f}" height="{bar}" '
                     f'fill="{BAR_COLORS[i % len(BAR_COLORS)]}"><title>{esc(name)}: {100 * acc:.1f}%, 95% interval '
                     f'{100 * low:.1f}-{100 * high:.1f}%</title></rect>')
        x0, x1, mid = left + scale * low, left + scale * high, y + bar / 2
        parts.append(f'<path class="ci" d="M{x0:.1f} {mid - 5:.1f}v10M{x0:.1f} {mid:.1f}H{x1:.1f}M{x1:.1f} '
                     f'{mid - 5:.1f}v10" stroke="#222" fill="none"/>')
        parts.append(f'<text x="{left + scale * high + 4:.1f}" y="{y + 13}" font-size="11">{100 * acc:.0f}%</text>')
    x = left + scale * chance
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="22" y2="{height}" stroke="#555" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x + 2:.1f}" y="{height - 2}" font-size="10" fill="#555">chance</text></svg>')
    return "".join(parts)


def token_spans(view: list[dict]) -> str:
    """A story as tokens coloured by loss; each one's title lists the model's top candidates there."""
    spans = []
    for t in view:
        tip = f"loss {t['loss']:.2f} nats; the model's top 5:\n" + "\n".join(
            f"{100 * p:5.1f}%  {tok!r}" for tok, p in t["top"])
        spans.append(f'<span style="background:{loss_color(t["loss"])}" title="{esc(tip)}">{esc(t["token"])}</span>')
    return "".join(spans)


def table_rows(report: dict) -> list[tuple[str, list[str], str]]:
    """The side-by-side numbers: (label, one cell per model, chance) per row."""
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    pct = lambda acc, ci: f"{100 * acc:.1f}% [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]"
    rows = [("parameters", [f"{m['params'] / 1e6:.2f}M" if m["params"] else "-" for m in models], ""),
            ("loss (nats/token)", [f"{m['loss']:.4f}" for m in models], ""),
            ("perplexity", [f"{m['perplexity']:.2f}" for m in models], ""),
            ("bits/byte", [f"{m['bits_per_byte']:.4f}" for m in models], ""),
            (f"cloze acc ({report['cloze_items']} items)", [pct(m["cloze_acc"], m["cloze_acc_ci"]) for m in models],
             "25%"),
            ("cloze acc per byte", [pct(m["cloze_acc_bytes"], m["cloze_acc_bytes_ci"]) for m in models], "25%")]
    if report["beginnings"]:
        story = [m.get("story") for m in models]
        cells = lambda key, form: [format(s[key], form) if s else "-" for s in story]
        rows += [(f"completions ({len(report['beginnings'])}): repeated 4-grams", cells("repetition", ".1%"), ""),
                 ("distinct bigrams", cells("distinct_2", ".1%"), ""),
                 ("reach end-of-text", cells("ended", ".0%"), ""),
                 ("beginning's characters carry on", cells("cast_kept", ".0%"), ""),
                 ("a new name takes over", cells("newcomer_takes_over", ".0%"), ""),
                 ("a new animal appears", cells("new_creatures", ".0%"), "")]
    judged = [m.get("judge") for m in models]
    if any(judged):
        for score in ("grammar", "creativity", "consistency", "plot"):
            rows.append((f"judge: {score} (0-10)", [f"{j[score]:.2f}" if j and j[score] is not None else "-"
                                                    for j in judged], ""))
        rows.append(("judge: parsed / unparseable / failed", [f"{j['parsed']} / {j['unparseable']} / {j['failed']}"
                                                               if j else "-" for j in judged], ""))
    for category, guess in report["chance"]["probes"].items():
        n = models[0]["probes"][category]["n"]
        for key, label in (("acc", "acc"), ("acc_bytes", "acc per byte")):
            rows.append((f"probes {category} {label} ({n})",
                         [pct(m["probes"][category][key], m["probes"][category][key + "_ci"]) for m in models],
                         f"{100 * guess:.0f}%"))
    return rows


def table(report: dict) -> str:
    """The side-by-side table as text: one row per number, one column per model, then chance."""
    names, rows = list(report["models"]), table_rows(report)
    widths = [max(len(r[0]) for r in rows)] + [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in
                                                enumerate(names)]
    lines = ["  ".join([" " * widths[0]] + [n.ljust(w) for n, w in zip(names, widths[1:])] + ["chance"])]
    for label, cells, guess in rows:
        lines.append("  ".join([label.ljust(widths[0])] + [c.ljust(w) for c, w in zip(cells, widths[1:])] + [guess]))
    return "\n".join(lines)


def html_table(report: dict) -> str:
    """The side-by-side numbers as an HTML table."""
    head = "".join(f"<th>{esc(n)}</th>" for n in report["models"])
    rows = "".join(f"<tr><td>{esc(label)}</td>{''.join(f'<td>{esc(c)}</td>' for c in cells)}"
                   f"<td class=chance>{esc(guess)}</td></tr>" for label, cells, guess in table_rows(report))
    return f"<table class=numbers><tr><th></th>{head}<th>chance</th></tr>{rows}</table>"


def probe_cell(model: dict, j: int) -> str:
    """A model's verdict on probe j by its scores (right when the right answer beats every wrong one), with its
    greedy completion when it wrote one."""
    verdict = ""
    if "probe_right" in model:
        right = model["probe_right"][j]
        verdict = f'<span class="verdict {"right" if right else "wrong"}">{"&#10003;" if right else "&#10007;"}</span> '
    return f"<td>{verdict}{esc(model['probe_completions'][j]) if 'probe_completions' in model else ''}</td>"


def heads_table(heads: list[list[dict]]) -> str:
    """A model's heads as a grid, a row per layer: L (local) or G (global), the mean distance each attends back
    over the held-out stories and its weight on the previous token, the cell shaded by that weight."""
    rows = []
    for layer, layer_heads in enumerate(heads):
        cells = "".join(f'<td style="background:hsl(30,80%,{97 - 35 * h["previous"]:.0f}%)" title="{esc(h["type"])} '
                        f'head, entropy {h["entropy"]:.2f} nats">{"L" if h["type"] == "local" else "G"} '
                        f'{h["distance"]:.1f} &middot; {100 * h["previous"]:.0f}%</td>' for h in layer_heads)
        rows.append(f"<tr><th>layer {layer}</th>{cells}</tr>")
    head = "".join(f"<th>head {h}</th>" for h in range(len(heads[0]) if heads else 0))
    return f"<table class=heads><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def render(report: dict) -> str:
    names = list(report["models"])
    models = report["models"]
    charts = [bar_chart(f"story cloze ({report['cloze_items']} items)",
                        {n: (models[n]["cloze_acc"], models[n]["cloze_acc_ci"]) for n in names},
                        report["chance"]["cloze"])]
    for category, guess in report["chance"]["probes"].items():
        scores = {n: (models[n]["probes"][category]["acc"], models[n]["probes"][category]["acc_ci"]) for n in names}
        charts.append(bar_chart(f"probes: {category}", scores, guess))
    shown = [n for n in names if "probe_completions" in models[n] or "probe_right" in models[n]]
    head = "".join(f"<th>{esc(n)}</th>" for n in shown)
    rows = []
    for j, probe in enumerate(report["probes"]):
        cells = "".join(probe_cell(models[n], j) for n in shown)
        rows.append(f"<tr><td>{esc(probe['category'])}</td><td>{esc(probe['prompt'])} "
                    f"<span class=right>{esc(probe['right'])}</span> / <span class=wrong>"
                    f"{esc(' / '.join(probe['wrong']))}</span></td>{cells}</tr>")
    heads = "".join(f"<h3>{esc(n)}</h3>{heads_table(models[n]['heads'])}" for n in names if models[n].get("heads"))
    views = [n for n in names if "token_views" in models[n]]
    stories = []
    for k in range(min((len(models[n]["token_views"]) for n in views), default=0)):
        columns = "".join(f"<div><b>{esc(n)}</b><div class=story>{token_spans(models[n]['token_views'][k])}</div></div>"
                          for n in views)
        stories.append(f'<div class=stories style="grid-template-columns: repeat({len(views)}, 1fr)">{columns}</div>')
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>TinyLM evaluation</title>"
            f"<style>{STYLE}</style></head><body><h1>TinyLM evaluation</h1>"
            f"<p>{esc(report['data'])}: {plural(report['stories'], 'story')}, {plural(report['cloze_items'], 'cloze item')}, "
            f"{plural(len(report['probes']), 'probe')}, {plural(len(report['beginnings']), 'completion')}.</p>"
            f"<h2>Side by side</h2>{html_table(report)}<p>Accuracies with their 95% Wilson intervals.</p>"
            f"<h2>Accuracy</h2><p>Whiskers: 95% intervals.</p><div class=charts>{''.join(charts)}</div>"
            f"<h2>Held-out stories, token by token</h2><p>Colour: the model's loss on the token (white 0 nats, red 8 "
            f"or more). Hover over a token for the model's five most likely tokens there.</p>{''.join(stories)}"
            f"<h2>Heads</h2><p>Each head over the held-out stories: L local or G global, the mean distance it "
            f"attends back (0: the token itself) and its weight on the previous token, shaded by that weight. "
            f"Distance heads show a small distance and a high previous weight; content heads attend further, by "
            f"what the tokens say.</p>{heads}"
            f"<h2>Probes and each model's greedy completion</h2><p><span class=right>&#10003;</span> / "
            f"<span class=wrong>&#10007;</span>: the model's scores put the right answer above every wrong one (the "
            f"acc rule), whatever it wrote.</p><table class=probes><tr><th>kind</th>"
            f"<th>prompt, <span class=right>right</span> / <span class=wrong>wrong</span></th>{head}</tr>"
            f"{''.join(rows)}</table></body></html>\n")
