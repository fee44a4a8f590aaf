"""The generated component reference in docs/ lists every first-party component."""

from pathlib import Path

import unfog

DOCS = Path(__file__).resolve().parents[2] / "docs" / "components.md"


def test_component_reference_lists_every_first_party_component() -> None:
    text = DOCS.read_text()
    missing = [f"{k}={n}" for k in unfog.KINDS for n in unfog.available(k)
               if unfog.get(k, n).distribution == "unfog" and f"`{k}={n}`" not in text]
    assert not missing, f"regenerate docs/components.md with `unfog list --markdown`: missing {missing}"
