"""Start the grading workers as Slurm jobs (dask-jobqueue) and keep the scheduler running.

On the cluster's login node, in the course checkout (its .venv made by ``make install``):

    .venv/bin/python deploy/slurm/cluster.py --jobs 8            # 8 Slurm jobs x 2 worker processes
    # prints: scheduler tcp://10.0.0.5:41234 ... ; then in another shell on the login node:
    .venv/bin/python -m autograder grade SUBMISSIONS --out results/ --executor dask --scheduler tcp://10.0.0.5:41234

``--print-script`` prints the Slurm job script and exits (nothing is submitted). The settings are in
``deploy/slurm/jobqueue.yaml`` (Dask configuration format); the scheduler runs in this process, so
stop it (Ctrl-C) after grading: the Slurm jobs are cancelled with it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import dask
import yaml

HERE = Path(__file__).resolve().parent
COURSE = HERE.parents[1]


def settings(path: Path = HERE / "jobqueue.yaml") -> dict:
    """The file's configuration with ``__COURSE__`` set to this checkout."""
    text = path.read_text().replace("__COURSE__", str(COURSE))
    return yaml.safe_load(text)


def make_cluster(**overrides):
    """A ``SLURMCluster`` from ``jobqueue.yaml`` (no job is submitted until it is scaled)."""
    from dask_jobqueue import SLURMCluster
    cfg = settings()
    dask.config.update(dask.config.config, {"distributed": cfg["distributed"]}, priority="new")
    slurm = {k.replace("-", "_"): v for k, v in cfg["jobqueue"]["slurm"].items() if v is not None}
    slurm.update(overrides)
    return SLURMCluster(**slurm)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4, help="Slurm jobs to start (default: %(default)s)")
    ap.add_argument("--print-script", action="store_true", help="print the job script and exit")
    args = ap.parse_args(argv)
    cluster = make_cluster()
    try:
        if args.print_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}  (dashboard {cluster.dashboard_link})", flush=True)
        print(f"grade with: .venv/bin/python -m autograder grade SUBMISSIONS --executor dask "
              f"--scheduler {cluster.scheduler_address}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
