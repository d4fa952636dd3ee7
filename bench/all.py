#!/usr/bin/env python3
"""Every bench script, one after the other (two at a time under --quick), with their figures.

    python3 bench/all.py            # the full benches (long: tens of minutes)
    python3 bench/all.py --quick    # a few iterations each (.ci/run runs this)

--quick is a smoke run so that the benches cannot rot unnoticed: it fails only when a script
crashes (a non-zero exit), never on a time or a missed target (those figures are meaningless
at a few iterations, on a loaded machine).  Targets are for the full runs, quoted in README.
Under --quick two scripts run at a time (each uses about one core: mostly CLI start-ups), and
each one's output is printed whole when it ends; the full runs go one at a time, on their own.
"""
import concurrent.futures
import pathlib
import subprocess
import sys
import threading
import time

BENCH = pathlib.Path(__file__).resolve().parent
#: every script here (each takes --quick); run.py first, as it is the overview
SCRIPTS = sorted((p.name for p in BENCH.glob("*.py") if p.name not in ("all.py",)
                  and not p.name.startswith("_")), key=lambda n: (n != "run.py", n))
#: scripts run at once under --quick
QUICK_JOBS = 2


def main(args):
    quick = "--quick" in args
    failed, lock = [], threading.Lock()

    def one(name):
        head = "\n== bench/%s %s" % (name, " ".join(args))
        if not quick:
            print(head, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / name), *args],
                              stdout=subprocess.PIPE if quick else None,
                              stderr=subprocess.STDOUT if quick else None)
        with lock:
            if quick:
                print(head, flush=True)
                sys.stdout.buffer.write(proc.stdout)
            print("== bench/%s: exit %d after %.0f s" % (name, proc.returncode,
                                                          time.perf_counter() - t0), flush=True)
            if proc.returncode:
                failed.append(name)
    with concurrent.futures.ThreadPoolExecutor(QUICK_JOBS if quick else 1) as pool:
        list(pool.map(one, SCRIPTS))
    if failed:
        print("\nbench/all.py: failed: %s" % "; ".join(sorted(failed)), flush=True)
        return 1
    print("\nbench/all.py: every script ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
