"""The README's two commands are the Makefile's, CI runs the README's test command, and the demo's prefixd
commands are real ones (the demo itself runs SmolLM2 for minutes: `make demo`)."""

import re
import subprocess
from pathlib import Path

from orchestrator.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("    make")]
    assert commands == ["make demo", "make test"]
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test"} <= targets
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_demo_uses_existing_commands_and_example_specs():
    dry = subprocess.run(["make", "-n", "demo", "STAMP="], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    dry = dry.replace("\\\n", " ")
    commands = re.findall(r"prefixd --home \S+ ([a-z-]+)", dry)
    assert {"submit", "run", "status", "models", "lookup", "generate"} <= set(commands), dry
    assert set(commands) <= set(COMMANDS)
    specs = re.findall(r"jobs/examples/\S+\.yaml", dry)
    assert len(specs) == 4 and all((ROOT / spec).is_file() for spec in specs)
