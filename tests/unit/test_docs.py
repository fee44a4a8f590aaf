"""The generated component reference in docs/ lists every first-party component."""

from pathlib import Path

import unfog

DOCS = Path(__file__).resolve().parents[2] / "docs" / "components.md"


def test_component_reference_lists_every_first_party_component() -> None:
    text = DOCS.read_text()
    from unfog.config import GROUPS

    missing = [f"{k}={n}" for k in unfog.KINDS for n in unfog.available(k)
               if unfog.get(k, n).distribution == "unfog" and f"`{GROUPS.get(k, k)}={n}`" not in text]
    assert not missing, f"regenerate docs/components.md with `unfog list --markdown`: missing {missing}"


def test_reliability_page_names_tests_that_exist() -> None:
    """Every case in docs/reliability.md is pinned by a test file of the repository."""
    import re

    root = DOCS.parents[1]
    page = (root / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", page))
    assert len(named) >= 5 and all((root / t).is_file() for t in named), named
    for test in re.findall(r"`(test_\w+)`", page):
        assert any(f"def {test}(" in f.read_text() for f in (root / "tests").rglob("test_*.py")), test
