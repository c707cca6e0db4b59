"""The README's file map must match the code: every listed file exists and stays within its stated line budget, and
every module, script and test file is listed (nanoVLM's README budgets drifted; this keeps ours honest)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BUDGET = 400  # one sitting: no file may be budgeted beyond this


def file_map() -> dict:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", section, flags=re.M)
    assert rows, "README has no file map table under '## Files'"
    return {path: int(n) for path, n in rows}


def test_file_map_line_budgets():
    for path, budget in file_map().items():
        full = os.path.join(ROOT, path)
        assert os.path.isfile(full), f"README lists {path}, which does not exist"
        assert budget <= MAX_BUDGET, f"README budgets {path} at {budget} lines, over the {MAX_BUDGET}-line limit"
        with open(full, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        assert lines <= budget, f"{path} has {lines} lines, over its README budget of {budget}"


def test_every_file_is_listed():
    listed = set(file_map())
    code = [os.path.relpath(p, ROOT) for pattern in ("minigmr/*.py", "*.py", "tools/*.py")
            for p in glob.glob(os.path.join(ROOT, pattern))]
    missing = sorted(p for p in code if p not in listed)
    assert not missing, f"not in the README's file map: {missing}"
