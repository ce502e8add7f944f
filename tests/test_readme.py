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
    """Every shipped bundle is in the README's table; the section says, before the figures, that they
    are patient-grouped cross-validation estimates, and which one is not (a split that also chose
    the checkpoint: optimistic, with what was measured on unseen patients). A cross-validated card
    leads with its table; the others say they are optimistic."""
    import json

    from mammocad.models.bundle import list_bundles

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Shipped models"):]
    section = section[:section.index("\n## ", 1)]
    intro, table = section.split("\n|", 1)
    assert "cross-validation" in intro and "optimistic" in intro.lower() and "chose its checkpoint" in intro
    assert "0.43" in intro  # the unseen-patient figure of the model that is not cross-validated
    for name in list_bundles():
        assert f"| `{name}`" in "|" + table
        folder = REPO / "src" / "mammocad" / "bundles" / name
        card_readme = (folder / "README.md").read_text()
        if "cross_validation" in json.loads((folder / "model.json").read_text()):
            assert "## Cross-validation: the estimate for new patients" in card_readme
        else:
            assert "**Optimistic.**" in card_readme
