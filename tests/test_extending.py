"""docs/EXTENDING.md: every Python block on the page runs, in order, as written."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_an_example_for_each_extension():
    text = DOC.read_text()
    for heading in ("## Your own profile", "## A model", "## A fine-tuning data set", "## A method", "## A task",
                    "## Use a fine-tuned run without qr_lib"):
        assert heading in text
    assert len(blocks()) >= 5


@pytest.mark.integration
def test_every_example_on_the_page_runs(tmp_path):
    namespace = {"WORK": tmp_path}
    for k, code in enumerate(blocks()):
        exec(compile(code, f"EXTENDING.md block {k + 1}", "exec"), namespace)
