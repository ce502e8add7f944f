"""The README contract: two set-up commands, and CI runs exactly the README's test command."""

import re

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_demo_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("mammocad demo")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == _readme_commands()[1]


def test_shipped_models_table_says_what_its_figures_are():
    """Every shipped bundle is in the README's table, and the section says, before the figures, that
    they come from one small split that also chose the checkpoint (so: optimistic), and quotes what
    was measured on unseen patients. A table of bare validation figures read as generalisation."""
    from mammocad.models.bundle import list_bundles

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Shipped models"):]
    section = section[:section.index("\n## ", 1)]
    intro, table = section.split("\n|", 1)
    assert "optimistic" in intro.lower() and "chose the checkpoint" in intro
    assert "0.43" in intro and "0.75" in intro  # the unseen-patient figures
    for name in list_bundles():
        assert f"| `{name}` |" in "|" + table
        card_readme = (REPO / "src" / "mammocad" / "bundles" / name / "README.md").read_text()
        assert "**Optimistic.**" in card_readme
