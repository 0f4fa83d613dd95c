"""Mean and spread over seeds of one-seed tables written separately by
`python -m sba_model.forecast.compare` (``--seeds S``, or the older single-seed tables), e.g.
on different machines; one ``compare`` run over several seeds summarises itself.

    python bench/seed_summary.py bench/results/los_loop.md bench/results/los_loop_seed1.md \\
        bench/results/los_loop_seed2.md --out bench/results/los_loop_seeds.md

Reads each table's ``avg MAE`` and ``avg RMSE`` columns by header name. A model is
summarised over the files that have it, with ``compare``'s mean ± sample sd; the per-seed
values are listed so nothing is hidden.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sba_model.forecast.compare import mean_sd, spread, write_text_atomic

COLUMNS = ("avg MAE", "avg RMSE")


def read_table(path: Path) -> dict[str, dict[str, float]]:
    """model -> {column: value} from the first markdown table in ``path``."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"{path}: no markdown table found")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    header = cells[0]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: table has no column {missing[0]!r}")
    several = [row[0] for row in cells[2:] if any("±" in row[header.index(c)] for c in COLUMNS)]
    if several:
        raise ValueError(f"{path}: {several[0]} holds a mean over several seeds; pass tables of one seed each")
    return {row[0]: {c: float(row[header.index(c)].strip("*")) for c in COLUMNS} for row in cells[2:]}


def summarise(paths: list[Path]) -> str:
    """Markdown, one row per model, lowest mean avg MAE first: files holding it, mean ± sd of
    each of `COLUMNS`, avg MAE of each file (– where the file lacks the model)."""
    tables = [read_table(p) for p in paths]
    models = list(dict.fromkeys(m for t in tables for m in t))
    values = {m: {c: [t[m][c] for t in tables if m in t] for c in COLUMNS} for m in models}
    lines = ["| model | seeds | " + " | ".join(f"{c} mean ± sd" for c in COLUMNS) + " | avg MAE per file |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for m in sorted(models, key=lambda m: mean_sd(values[m]["avg MAE"])[0]):
        seeds = len(values[m]["avg MAE"])
        stats = [spread(values[m][c]) + (" (one seed)" if seeds == 1 else "") for c in COLUMNS]
        per_file = ", ".join(f"{t[m]['avg MAE']:.3f}" if m in t else "–" for t in tables)
        lines.append(f"| {m} | {seeds} | " + " | ".join(stats) + f" | {per_file} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/seed_summary.py", *(argv if argv is not None else sys.argv[1:])])
    text = (f"# Over seeds\n\nCommand: `{command}`\n\n"
            f"Files, in the per-file column's order: {', '.join(f'`{p}`' for p in args.tables)}.\n\n"
            + summarise(args.tables))
    if args.out is None:
        sys.stdout.write(text)
        return 0
    write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
