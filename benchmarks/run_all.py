"""Run every benchmark script in this folder; each writes its own section of docs/benchmarks.md.

Benchmarks compare against a baseline measured in the same run (fp32 vs quantised, raw runtime vs
agent, telemetry off vs on, SQLite vs PostgreSQL), so their verdicts hold on any machine; absolute
figures depend on the host and are printed with it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=HERE.parent, check=False).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
