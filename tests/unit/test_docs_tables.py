"""docs/architecture.md's test-cost tables are the committed cost logs (docs/testing/) rendered by tests/costs.py:
a table edited by hand, or a log replaced without re-rendering (`python tests/costs.py --write-docs`), fails here."""

import costs


def test_the_cost_tables_are_the_committed_logs():
    page = (costs.DOCS / "architecture.md").read_text()
    assert costs.docs_section() in page, "re-render with: python tests/costs.py --write-docs"
