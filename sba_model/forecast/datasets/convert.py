"""Convert the original files of the bundled datasets into the copies the package ships.

    python -m sba_model.forecast.datasets.convert                      # originals from the default source
    python -m sba_model.forecast.datasets.convert --src /path/to/data  # any folder holding <name>/...

``--src`` defaults to ``$SBA_DATA_ROOT``, else the ``shared/data`` folder beside this checkout.
For each dataset it writes ``<dest>/<name>/<name>.npz`` with `sba_model.forecast.data.save_npz`, so the
file holds exactly what ``sba_model.forecast.data.load(name)`` derives from the originals: ``values``
float32 ``[T, N, C]``, ``mask`` bool, ``adjacency`` float64 ``[N, N]`` (symmetric, zero
diagonal; the Gaussian kernel already applied where the originals hold distances) and
``timestamps`` int64 seconds. The graph stays float64 so that partitions and positional
encodings do not move; it is sparse and compresses to a few kB. Where the originals hold
distances, a conversion on another CPU may differ from the shipped weights in the last bit
(numpy's ``exp`` rounds by SIMD kernel); the edges are the same. The upstream ``LICENSE*`` files
of ``<src>/<name>/`` are copied beside the ``.npz``; the ``README.md`` there (origin, license,
citation) is written by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from . import FOLDER, NAMES, read_original, shipped_file
from ..data import save_npz, validate

__all__ = ["default_source", "convert", "main"]


def default_source() -> Path:
    """``$SBA_DATA_ROOT``, else the ``shared/data`` folder beside the checkout holding this package."""
    env = os.environ.get("SBA_DATA_ROOT")
    return Path(env) if env else FOLDER.parents[3] / "shared" / "data"


def convert(name: str, src, dest=FOLDER) -> Path:
    """Read dataset ``name`` from the originals in ``src/<name>/`` and write its copy and license
    files into ``dest/<name>/``. Returns the path of the ``.npz``."""
    data = validate(read_original(name, src), name=name)
    target = shipped_file(name, dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_npz(data, target)
    for license_file in sorted((Path(src) / name).glob("LICENSE*")):
        shutil.copyfile(license_file, target.parent / license_file.name)
    return target


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m sba_model.forecast.datasets.convert", description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=None,
                   help="folder holding <name>/ with the original files (default $SBA_DATA_ROOT, else "
                        "shared/data beside the checkout)")
    p.add_argument("--dest", type=Path, default=FOLDER, help=f"where <name>/<name>.npz go (default {FOLDER})")
    p.add_argument("--names", nargs="+", choices=NAMES, default=list(NAMES))
    a = p.parse_args(argv)
    src = a.src or default_source()
    if not src.is_dir():
        raise ValueError(f"src: no folder {src} (give --src, or set SBA_DATA_ROOT, to the original files)")
    written = []
    for name in a.names:
        path = convert(name, src, a.dest)
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
