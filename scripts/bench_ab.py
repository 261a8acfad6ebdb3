"""A/B of ``longattn bench`` between two source trees, taking turns: a change must show no slowdown.

Each round runs the same bench command once from each tree, in alternating order (A B, B A, ...), so that a
shared machine's drift hits both sides alike; the table gives each experiment's median over the rounds and
the after/before ratio. Example, a refactor against the last commit before it::

    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/bench_ab.py --before /tmp/before/src --after src --rounds 4 --out /tmp/ab

Arguments after ``--`` replace the default bench arguments (patterns, paths, modes, lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_BENCH = ["--patterns", "longformer_512", "bigbird_64", "strided_128_causal", "fixed_128_8",
                 "--paths", "blocked", "--modes", "fwd", "fwd+bwd", "--lengths", "4096", "8192",
                 "--min-run-time", "1"]


def run_bench(src: str, bench_args: list[str], out: Path) -> list[dict]:
    """One ``longattn bench`` run with ``src`` first on the import path; its result rows."""
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    main = "import sys; from longattn.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", main, "bench", *bench_args, "--no-progress", "--out", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    data = json.loads((out / "bench.json").read_text())
    return data["results"] if isinstance(data, dict) else data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--before", required=True, help="source folder of the reference (holds longattn/)")
    parser.add_argument("--after", required=True, help="source folder of the change")
    parser.add_argument("--rounds", type=int, default=3, help="bench runs per side")
    parser.add_argument("--out", default="results/bench_ab", help="folder for each run's bench.json")
    args, rest = parser.parse_known_args()
    bench_args = rest[1:] if rest[:1] == ["--"] else (rest or DEFAULT_BENCH)
    trees = {"before": args.before, "after": args.after}
    times: dict[tuple, dict[str, list[float]]] = {}
    machine = None
    for r in range(args.rounds):
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            rows = run_bench(trees[side], bench_args, Path(args.out) / f"{side}_{r}")
            for row in rows:
                if row["time_ms"] is not None:
                    key = (row["pattern"], row["path"], row["mode"], row["dtype"], row["seq_len"])
                    times.setdefault(key, {}).setdefault(side, []).append(row["time_ms"])
            machine = json.loads((Path(args.out) / f"{side}_{r}" / "bench.json").read_text()).get("machine", machine)
            print(f"round {r}: {side} done", flush=True)
    print(f"machine: {machine}")
    print("| pattern | path | mode | dtype | N | before ms | after ms | after/before | runs before | runs after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for key, sides in sorted(times.items()):
        before, after = statistics.median(sides["before"]), statistics.median(sides["after"])
        ratios.append(after / before)
        runs = [" ".join(f"{t:.0f}" for t in sides[s]) for s in ("before", "after")]
        print("| " + " | ".join(map(str, key)) + f" | {before:.1f} | {after:.1f} | {after / before:.3f} | "
              f"{runs[0]} | {runs[1]} |")
    print(f"geometric mean after/before: {statistics.geometric_mean(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
