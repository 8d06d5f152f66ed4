"""README's first command, as README spells it, in a fresh clone with nothing beside it.

The repository is cloned (committed state, as CI and users get it) into an empty temporary
directory, so there is no ../shared and no built extension; the command runs in a new virtual
environment, so nothing installed for the test suite helps it.
"""
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1500  # installs, the build and the demo take about 3 minutes on a quiet 2-core machine


def readme_commands() -> list[str]:
    """The ```bash blocks of README's "Set up and run" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0].endswith("python -m aqlm demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_main_command_runs_in_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    command = readme_commands()[0]
    clone = tmp_path / "fresh" / "aqlm"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert not (clone.parent.parent / "shared").exists() and not (clone.parent / "shared").exists()
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    env = {key: value for key, value in os.environ.items()
           if key not in ("AQLM_SHARED_DATA", "PYTHONPATH", "VIRTUAL_ENV", "AQLM_SIMD")}
    env.update(PATH=f"{environment / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(environment),
               AQLM_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    log = tmp_path / "fresh-clone.log"
    with open(log, "w") as handle:
        handle.write(f"$ {command}\n")
        handle.flush()
        process = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    output = log.read_text()
    print(f"log: {log}", file=sys.stderr)
    assert returncode is not None, f"README's command did not finish in {TIMEOUT_S} s; its log ends:\n{output[-3000:]}"
    assert returncode == 0, f"README's command failed ({returncode}); its log ends:\n{output[-4000:]}"
    rows = [line.split() for line in output.splitlines() if line.startswith("  ") and line.split()]
    assert [row[0] for row in rows][-3:] == ["dense", "RTN", "AQLM"], output[-2000:]
    assert (clone / "aqlm-demo" / "model.safetensors").is_file()


def test_unbuilt_source_tree_says_so_in_one_line(tmp_path: Path) -> None:
    """`python -m aqlm` from a checkout whose extension was never built (e.g. after `pip install .`,
    run from the root) prints one line naming the fix instead of a circular-import traceback.
    ``-S`` keeps site-packages (and this environment's editable install) out of the child."""
    shutil.copytree(ROOT / "aqlm", tmp_path / "aqlm", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    result = subprocess.run([sys.executable, "-S", "-m", "aqlm", "demo"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "C extension is not built" in lines[0] and "pip install -e ." in lines[0]
    imported = subprocess.run([sys.executable, "-S", "-c", "import aqlm"], cwd=tmp_path, capture_output=True, text=True)
    assert imported.returncode == 1
    assert imported.stderr.strip().splitlines()[-1].startswith("ImportError: aqlm's C extension is not built")
