"""Redraw the charts of saved results without re-running anything.

    python benchmarks/plot.py benchmarks/results/e2e.json benchmarks/results/startup.json

Each PNG is written next to its JSON (same name, .png).  The drawing code lives in the benchmark scripts
(bench_e2e.plot, bench_startup.plot); this only dispatches on the JSON's "benchmark" field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.strip())
        return 2
    import bench_e2e
    import bench_startup

    plotters = {"e2e": bench_e2e.plot, "startup": bench_startup.plot}
    for path in paths:
        data = json.loads(path.read_text())
        kind = data.get("benchmark")
        if kind not in plotters:
            print(f"{path}: not an e2e or startup result (benchmark={kind!r})", file=sys.stderr)
            return 1
        plotters[kind](data, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
