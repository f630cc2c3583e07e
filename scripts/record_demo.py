"""Record the multi-seed result of the demo config, for the report of a one-seed `make demo`.

    python scripts/record_demo.py runs/demo-seeds012 [runs/demo-seed3 ...] [--note TEXT]

Each argument is a run directory of the same config (``gradsift demo --set "seeds=[0,1,2]"``,
or one seed per directory); their runs are merged, per method and seed: the refusal rate,
the harmful compliance and the over-refusal per checkpoint, AA, and the health verdicts
(:func:`gradsift.report.section_health.recorded_summary`). The result goes to
``src/gradsift/data/builtin/demo_recorded.json`` (``--out`` to write elsewhere), where the
report of a run of the same config (same model, tasks, methods, optimizer and evaluation
sets) finds it and shows it beside the run's own numbers, labelled as recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from gradsift.report import load_run
    from gradsift.report.section_health import RECORDED_FILE, recorded_summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--note", default="", help="a line shown under the recorded table")
    ap.add_argument("--out", type=Path, default=RECORDED_FILE)
    args = ap.parse_args(argv)
    merged: dict | None = None
    machines = []
    for run_dir in args.runs:
        summary = recorded_summary(load_run(run_dir))
        env = run_dir / "environment.json"
        if env.exists():
            e = json.loads(env.read_text())
            machines.append(f"{e.get('cpu')} x{e.get('cpu_count')}, torch {e.get('torch')}")
        if merged is None:
            merged = summary
            continue
        if summary["fingerprint"] != merged["fingerprint"]:
            print(f"{run_dir}: a different config from {args.runs[0]}; not merged", file=sys.stderr)
            return 2
        for method, by_seed in summary["runs"].items():
            merged["runs"].setdefault(method, {}).update(by_seed)
    assert merged is not None
    merged["seeds"] = sorted({int(s) for by_seed in merged["runs"].values() for s in by_seed})
    merged["measured"] = f"{date.today().isoformat()}, " + ("; ".join(dict.fromkeys(machines)) or "machine unknown")
    merged["note"] = args.note
    args.out.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: seeds {merged['seeds']}, methods {', '.join(merged['runs'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
