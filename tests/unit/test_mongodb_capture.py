"""The pure decisions of MongoDB capture and reconcile (no server)."""

from __future__ import annotations

import datetime as dt

import bson
import pytest
from bson import Binary, ObjectId

from failover.core.reconcile import ConflictPolicy, Resolution
from failover.stores.mongodb.capture import (
    CONFLICTS,
    JOURNAL,
    LIBRARY_COLLECTIONS,
    LOCKS,
    UNKNOWN,
    MongoJournal,
    _arguments,
    _merge,
    _plain,
    document_changed,
    fixed_id,
    journal_key,
    plan_copy,
)


def image(doc: dict | None) -> Binary | None:
    return None if doc is None else Binary(bson.encode(doc))


@pytest.mark.parametrize(
    ("filter", "expected"),
    [
        ({"_id": 5}, (True, 5)),
        ({"_id": 5, "other": 1}, (True, 5)),
        ({"_id": {"$eq": "a"}}, (True, "a")),
        ({"_id": {"$in": [1, 2]}}, (False, None)),
        ({"_id": {"$gt": 1}}, (False, None)),
        ({"_id": {"a": 1}}, (True, {"a": 1})),  # an embedded document as _id is an equality
        ({"name": "x"}, (False, None)),
        ({}, (False, None)),
        (None, (False, None)),
    ],
)
def test_fixed_id(filter: object, expected: tuple[bool, object]) -> None:
    assert fixed_id(filter) == expected


def test_journal_key_tells_types_collections_and_databases_apart() -> None:
    oid = ObjectId()
    keys = {
        journal_key(None, "c", 1),
        journal_key(None, "c", "1"),
        journal_key(None, "c", 1.5),
        journal_key(None, "d", 1),
        journal_key("other", "c", 1),
        journal_key(None, "c", oid),
        journal_key(None, "c", {"a": 1}),
    }
    assert len(keys) == 7
    assert journal_key(None, "c", oid) == journal_key(None, "c", ObjectId(str(oid)))


def test_document_changed() -> None:
    doc = {"_id": 1, "a": 1, "b": {"c": [1, 2]}}
    assert not document_changed(image(doc), dict(doc))
    assert not document_changed(image(doc), {"b": {"c": [1, 2]}, "a": 1, "_id": 1})  # field order aside
    assert document_changed(image(doc), {**doc, "a": 2})
    assert document_changed(image(doc), None)  # deleted on the fallback
    assert document_changed(None, doc)  # inserted on the fallback
    assert not document_changed(None, None)  # absent before and now: nothing happened
    assert document_changed(UNKNOWN, doc)


P = ConflictPolicy


def test_plan_copy_never_copies_what_the_fallback_did_not_change() -> None:
    stale = {"_id": 1, "v": "old"}
    newer = {"_id": 1, "v": "newer on the primary"}
    # A crash between intent and write: the fallback's document equals the image.
    for policy in P:
        assert plan_copy(image(stale), stale, newer, policy, 1.0) == ("skip", None)
        assert plan_copy(None, None, newer, policy, 1.0) == ("skip", None)  # never delete what we did not delete


def test_plan_copy_copies_and_deletes_without_conflict_when_the_primary_did_not_move() -> None:
    before = {"_id": 1, "v": 0}
    after = {"_id": 1, "v": 1}
    assert plan_copy(image(before), after, before, P.PRIMARY_WINS, 1.0) == ("replace", None)
    assert plan_copy(image(before), None, before, P.PRIMARY_WINS, 1.0) == ("delete", None)
    assert plan_copy(None, after, None, P.PRIMARY_WINS, 1.0) == ("replace", None)
    assert plan_copy(image(before), after, after, P.PRIMARY_WINS, 1.0) == ("skip", None)  # already there


def test_plan_copy_conflicts_follow_the_policy() -> None:
    before = {"_id": 1, "v": 0, "n": 10}
    mine = {"_id": 1, "v": "fallback", "n": 11}
    later = dt.datetime(2030, 1, 1)
    theirs = {"_id": 1, "v": "primary", "n": 15, "updated_at": later}
    action, conflict = plan_copy(image(before), mine, theirs, P.FALLBACK_WINS, 1.0)
    assert action == "replace" and conflict is not None and conflict[0] is Resolution.FALLBACK_KEPT
    action, conflict = plan_copy(image(before), mine, theirs, P.PRIMARY_WINS, 1.0)
    assert action == "skip" and conflict is not None and conflict[0] is Resolution.PRIMARY_KEPT
    # newest_wins: the primary's updated_at against the fallback's last capture time.
    assert plan_copy(image(before), mine, theirs, P.NEWEST_WINS, later.timestamp() - 10)[0] == "skip"
    assert plan_copy(image(before), mine, theirs, P.NEWEST_WINS, later.timestamp() + 10)[0] == "replace"
    untimed = {"_id": 1, "v": "primary"}
    assert plan_copy(image(before), mine, untimed, P.NEWEST_WINS, 1.0)[0] == "replace"
    # A document the primary created meanwhile, under the same _id, is a conflict too.
    assert plan_copy(None, mine, untimed, P.PRIMARY_WINS, 1.0)[0] == "skip"
    # A delete on the fallback against a changed primary document.
    action, conflict = plan_copy(image(before), None, untimed, P.FALLBACK_WINS, 1.0)
    assert action == "delete" and conflict is not None


def test_unknown_image_is_a_conflict_unless_the_primary_already_agrees() -> None:
    mine = {"_id": 1, "v": 1}
    assert plan_copy(UNKNOWN, mine, mine, P.PRIMARY_WINS, 1.0) == ("skip", None)
    assert plan_copy(UNKNOWN, mine, {"_id": 1}, P.PRIMARY_WINS, 1.0)[0] == "skip"
    assert plan_copy(UNKNOWN, mine, {"_id": 1}, P.FALLBACK_WINS, 1.0)[0] == "replace"


def test_library_collections_are_never_captured() -> None:
    assert LIBRARY_COLLECTIONS == {JOURNAL, CONFLICTS, LOCKS}
    for name in (JOURNAL, CONFLICTS, LOCKS, "system.views"):
        assert not MongoJournal.captures(name)
    assert MongoJournal.captures("items")


def test_arguments_bind_positional_and_keyword_like_pymongo() -> None:
    assert _arguments("update_one", ({"a": 1}, {"$set": {"b": 1}}, True), {}) == {
        "filter": {"a": 1},
        "update": {"$set": {"b": 1}},
        "upsert": True,
    }
    assert _arguments("find_one_and_update", ({"a": 1}, {"$set": {}}), {"return_document": True}) == {
        "filter": {"a": 1},
        "update": {"$set": {}},
        "return_document": True,
    }
    with pytest.raises(TypeError):
        _arguments("delete_one", (), {"nope": 1})


def test_merge_maps_sub_bulk_indexes_to_the_callers() -> None:
    totals = {
        "writeErrors": [], "writeConcernErrors": [], "nInserted": 0, "nUpserted": 0,
        "nMatched": 0, "nModified": 0, "nRemoved": 0, "upserted": [],
    }  # fmt: skip
    _merge(
        totals,
        {"nInserted": 1, "nUpserted": 1, "upserted": [{"index": 1, "_id": "x"}],
         "writeErrors": [{"index": 0, "code": 11000}]},
        [3, 7],
    )  # fmt: skip
    assert totals["upserted"] == [{"index": 7, "_id": "x"}]
    assert totals["writeErrors"] == [{"index": 3, "code": 11000}]
    assert totals["nInserted"] == 1 and totals["nUpserted"] == 1


def test_conflict_summaries_are_storable() -> None:
    assert _plain({"$set": 1, "a.b": {"c": [{"$x": 1}]}}) == {"\uff04set": 1, "a\uff0eb": {"c": [{"\uff04x": 1}]}}
