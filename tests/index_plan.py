"""Proof that a query reads only the documents it returns: the database's own explain.

A query is scan-free here when its winning plan is an index scan whose bounds are the
whole filter (no residual ``filter`` on the FETCH stage) and the documents examined
equal the documents returned. Real MongoDB counts ``totalDocsExamined`` itself;
secantusdb reports the plan it will use and, for an index-bounded plan, examines only
the returned documents - both satisfy the same assertion, and a plan that walks a wider
index (``status`` alone) or the collection fails it.
"""

from __future__ import annotations

from typing import Any

from pymongo.collection import Collection

Document = dict[str, Any]


def _input_stage(plan: Document) -> Document:
    while plan.get("stage") not in {"IXSCAN", "COLLSCAN"} and "inputStage" in plan:
        plan = plan["inputStage"]
    return plan


def assert_index_bounded(
    collection: Collection[Document], query: Document, index_keys: dict[str, int], returned: int
) -> None:
    """``query`` uses the index on ``index_keys``, reads nothing beyond ``returned`` documents."""
    explained = collection.find(query).explain()
    winning = explained["queryPlanner"]["winningPlan"]
    scan = _input_stage(winning)
    assert scan.get("stage") == "IXSCAN", f"not an index scan: {winning}"
    assert dict(scan["keyPattern"]) == index_keys, f"wrong index: {scan['keyPattern']}"
    assert "filter" not in winning, f"documents re-checked after the index: {winning}"
    stats = explained["executionStats"]
    assert stats["nReturned"] == returned, stats
    assert stats["totalDocsExamined"] == returned, stats
