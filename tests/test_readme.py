"""The README's claims that can drift: the line counts of its code map, and the commands CI runs."""
import re

from conftest import ROOT


def test_code_map_line_counts_are_true():
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 15, "the README's code map lost its table"
    for path, n in rows:
        actual = len((ROOT / path).read_text().splitlines())
        assert int(n) == actual, f"README says {path} has {n} lines; it has {actual}"
    listed = {p for p, _ in rows}
    for pattern in ("nanollava/*.py", "kernels/*.py", "*.py"):
        for f in ROOT.glob(pattern):
            assert str(f.relative_to(ROOT)) in listed, f"{f.relative_to(ROOT)} is missing from the README's code map"


def test_ci_runs_the_readme_install_and_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements.txt -r requirements-test.txt && python -m pytest tests -q" in readme
    assert "pip install -q -r requirements.txt -r requirements-test.txt" in ci and "python -m pytest tests -q" in ci
