"""Mean and spread over seeds of the tables `python -m sba_model.forecast.compare` writes.

    python bench/seed_summary.py bench/results/los_loop.md bench/results/los_loop_seed1.md \\
        bench/results/los_loop_seed2.md --out bench/results/los_loop_seeds.md

Reads each table's ``avg MAE`` and ``avg RMSE`` columns by header name. A model is
summarised over the files that have it; the per-seed values are listed so nothing is hidden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

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
    return {row[0]: {c: float(row[header.index(c)].strip("*")) for c in COLUMNS} for row in cells[2:]}


def summarise(paths: list[Path]) -> str:
    tables = [read_table(p) for p in paths]
    models = list(dict.fromkeys(m for t in tables for m in t))
    lines = ["| model | seeds | " + " | ".join(f"{c} mean ± sd" for c in COLUMNS) + " | avg MAE per file |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for m in sorted(models, key=lambda m: statistics.mean(t[m]["avg MAE"] for t in tables if m in t)):
        have = [t[m] for t in tables if m in t]
        stats = []
        for c in COLUMNS:
            values = [h[c] for h in have]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else " (one seed)"
            stats.append(f"{statistics.mean(values):.3f}{spread}")
        per_file = ", ".join(f"{t[m]['avg MAE']:.3f}" if m in t else "–" for t in tables)
        lines.append(f"| {m} | {len(have)} | " + " | ".join(stats) + f" | {per_file} |")
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
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)                      # atomic: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
