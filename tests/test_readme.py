"""The README's set-up commands are the ones CI runs, so they cannot drift apart unnoticed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_test_command_matches_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_lines = {
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    test_commands = [block for block in bash_blocks(readme) if "pytest" in block]
    assert len(test_commands) == 1, "the README should show exactly one test command"

    steps = [step.strip() for step in test_commands[0].strip().split("&&")]
    assert len(steps) >= 3
    for step in steps:
        assert step in ci_lines, f"README step {step!r} is not a line of .ci/run"


def test_readme_run_command_starts_the_bot():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run_commands = [block for block in bash_blocks(readme) if "python -m bot" in block]
    assert any("DISCORD_TOKEN=" in block and "pip install" in block for block in run_commands)
