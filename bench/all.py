#!/usr/bin/env python3
"""Every bench script, one after the other, with their figures printed as they come.

    python3 bench/all.py            # the full benches (long: tens of minutes)
    python3 bench/all.py --quick    # a few iterations each (.ci/run runs this)

--quick is a smoke run so that the benches cannot rot unnoticed: it fails only when a script
crashes (a non-zero exit), never on a time or a missed target (those figures are meaningless
at a few iterations, on a loaded machine).  Targets are for the full runs, quoted in README.
"""
import pathlib
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
#: every script here (each takes --quick); run.py first, as it is the overview
SCRIPTS = sorted((p.name for p in BENCH.glob("*.py") if p.name not in ("all.py",)
                  and not p.name.startswith("_")), key=lambda n: (n != "run.py", n))


def main(args):
    failed = []
    for name in SCRIPTS:
        print("\n== bench/%s %s" % (name, " ".join(args)), flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(BENCH / name), *args])
        print("== bench/%s: exit %d after %.0f s" % (name, code, time.perf_counter() - t0), flush=True)
        if code:
            failed.append(name)
    if failed:
        print("\nbench/all.py: failed: %s" % "; ".join(failed), flush=True)
        return 1
    print("\nbench/all.py: every script ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
