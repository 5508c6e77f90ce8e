"""Lambda event filtering: pattern compilation, its errors, and matching (`eventfn.filters`)."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import msgspec
import pytest

from eventfn.errors import ConfigError
from eventfn.filters import MAX_PATTERNS, Filter, compile_filters, decode_body

WHERE = "handlers/orders.toml: trigger t0"


def passes(pattern: dict[str, Any], document: dict[str, Any]) -> bool:
    """Match one pattern, given both as a table and as JSON text; the two must agree."""
    as_dict = compile_filters([pattern], WHERE).matches(document)
    as_json = compile_filters([json.dumps(pattern)], WHERE).matches(document)
    assert as_dict == as_json, f"dict and JSON forms of {pattern} disagree on {document}"
    return as_dict


def body(text: str) -> dict[str, Any]:
    """A document whose body is `text` decoded as the dispatcher should decode it."""
    return {"subject": "events.orders.created", "body": decode_body(text), "attributes": {}, "headers": {}}


def compile_error(pattern: object) -> str:
    with pytest.raises(ConfigError) as info:
        compile_filters([pattern], WHERE)  # type: ignore[list-item]
    return str(info.value)


# Exact values


def test_string_matches_exactly_and_case_sensitively() -> None:
    pattern = {"body": {"state": ["Alice"]}}
    assert passes(pattern, body('{"state": "Alice"}'))
    assert not passes(pattern, body('{"state": "alice"}'))
    assert not passes(pattern, body('{"state": "Alice "}'))


def test_alternatives_in_a_leaf_are_ored() -> None:
    pattern = {"body": {"kind": ["Credit", "Debit"]}}
    assert passes(pattern, body('{"kind": "Credit"}'))
    assert passes(pattern, body('{"kind": "Debit"}'))
    assert not passes(pattern, body('{"kind": "Refund"}'))


def test_bool_matches_only_the_same_bool_not_a_number() -> None:
    assert passes({"flag": [True]}, {"flag": True})
    assert not passes({"flag": [True]}, {"flag": False})
    assert not passes({"flag": [True]}, {"flag": 1})
    assert not passes({"flag": [1]}, {"flag": True})
    assert passes({"flag": [False]}, {"flag": False})
    assert not passes({"flag": [False]}, {"flag": 0})


@pytest.mark.parametrize(
    ("pattern_number", "document_number", "expected"),
    [
        ("300", "300", True),
        ("300", "300.0", False),
        ("300", "3.0e2", False),
        ("300.0", "300.0", True),
        ("300.0", "3.0e2", False),
        ("3.0e2", "3.0e2", True),
        ("3.0e2", "300", False),
        ("-1.5", "-1.5", True),
    ],
)
def test_numbers_match_by_their_json_text(pattern_number: str, document_number: str, expected: bool) -> None:
    criteria = compile_filters([f'{{"body": {{"amount": [{pattern_number}]}}}}'], WHERE)
    assert criteria.matches(body(f'{{"amount": {document_number}}}')) is expected


def test_number_does_not_match_a_string_of_the_same_digits() -> None:
    assert not passes({"amount": [300]}, {"amount": "300"})
    assert not passes({"amount": ["300"]}, {"amount": 300})


def test_table_pattern_float_matches_a_document_decoded_by_another_json_library() -> None:
    # TOML and msgspec keep no number text: both sides are compared as json.dumps would write them.
    document = {"body": msgspec.json.decode(b'{"amount": 300.0, "count": 300}')}
    assert compile_filters([{"body": {"amount": [300.0]}}], WHERE).matches(document)
    assert not compile_filters([{"body": {"amount": [300]}}], WHERE).matches(document)
    assert compile_filters([{"body": {"count": [300]}}], WHERE).matches(document)
    assert not compile_filters([{"body": {"count": [300.0]}}], WHERE).matches(document)


def test_null_matches_a_null_value_but_not_a_missing_key_or_other_values() -> None:
    pattern = {"body": {"user": [None]}}
    assert passes(pattern, body('{"user": null}'))
    assert not passes(pattern, body("{}"))
    assert not passes(pattern, body('{"user": ""}'))
    assert not passes(pattern, body('{"user": false}'))


def test_empty_string_matches_only_an_empty_string() -> None:
    pattern = {"body": {"last_name": [""]}}
    assert passes(pattern, body('{"last_name": ""}'))
    assert not passes(pattern, body('{"last_name": null}'))
    assert not passes(pattern, body('{"last_name": " "}'))
    assert not passes(pattern, body("{}"))


# Objects: AND within a pattern, OR across patterns


def test_nested_object_pattern_matches_a_nested_document() -> None:
    pattern = {"body": {"order": {"customer": {"tier": ["gold"]}}}}
    assert passes(pattern, body('{"order": {"customer": {"tier": "gold", "id": 7}}}'))
    assert not passes(pattern, body('{"order": {"customer": {"tier": "silver"}}}'))
    assert not passes(pattern, body('{"order": {"customer": "gold"}}'))


def test_every_key_of_a_pattern_must_match() -> None:
    pattern = {"subject": ["events.orders.created"], "body": {"amount": [{"numeric": [">", 100]}], "currency": ["EUR"]}}
    document = body('{"amount": 150, "currency": "EUR"}')
    assert passes(pattern, document)
    assert not passes(pattern, body('{"amount": 150, "currency": "USD"}'))
    assert not passes(pattern, body('{"amount": 50, "currency": "EUR"}'))
    assert not passes(pattern, {**document, "subject": "events.orders.deleted"})


def test_an_event_passes_if_any_pattern_matches() -> None:
    criteria = compile_filters([{"body": {"kind": ["a"]}}, '{"body": {"kind": ["b"]}}', {"subject": ["x"]}], WHERE)
    assert criteria.matches(body('{"kind": "a"}'))
    assert criteria.matches(body('{"kind": "b"}'))
    assert criteria.matches({"subject": "x", "body": "plain"})
    assert not criteria.matches(body('{"kind": "c"}'))


def test_no_patterns_pass_every_event() -> None:
    for criteria in (Filter(), compile_filters([], WHERE)):
        assert criteria.matches_everything
        assert criteria.matches({})
        assert criteria.matches(body("not json"))
    assert not compile_filters([{"a": ["b"]}], WHERE).matches_everything


def test_a_key_missing_from_the_document_fails_the_match() -> None:
    assert not passes({"body": {"amount": [1]}}, body('{"count": 1}'))
    assert not passes({"body": {"amount": [1]}}, {"subject": "s"})
    assert not passes({"missing": [{"anything-but": ["x"]}]}, {"other": "y"})


def test_keys_the_pattern_does_not_name_are_ignored() -> None:
    assert passes({"body": {"a": ["1"]}}, body('{"a": "1", "b": {"c": [1, 2]}, "d": null}'))


@pytest.mark.parametrize("text", ["plain text", '"a JSON string"', "42", "[1, 2]", "null"])
def test_pattern_on_body_fields_does_not_match_a_body_that_is_not_an_object(text: str) -> None:
    assert not passes({"body": {"amount": [{"exists": True}]}}, body(text))
    assert not passes({"body": {"amount": [{"exists": False}]}}, body(text))
    assert not passes({"body": {"amount": [{"anything-but": ["x"]}]}}, body(text))


def test_pattern_on_the_whole_body_matches_a_plain_text_body() -> None:
    assert passes({"body": [{"prefix": "ERROR"}]}, body("ERROR: disk full"))
    assert not passes({"body": [{"prefix": "ERROR"}]}, body("INFO: all good"))


def test_leaf_does_not_match_an_object_value() -> None:
    assert not passes({"body": {"a": ["x"]}}, body('{"a": {"b": "x"}}'))
    assert not passes({"body": {"a": [{"anything-but": ["x"]}]}}, body('{"a": {"b": "y"}}'))


# Arrays in documents


def test_list_in_document_matches_if_any_element_matches() -> None:
    pattern = {"body": {"tags": ["urgent"]}}
    assert passes(pattern, body('{"tags": ["new", "urgent"]}'))
    assert not passes(pattern, body('{"tags": ["new", "later"]}'))
    assert not passes(pattern, body('{"tags": []}'))


def test_operators_apply_to_each_list_element() -> None:
    assert passes({"body": {"n": [{"numeric": [">", 10]}]}}, body('{"n": [1, 2, 30]}'))
    assert not passes({"body": {"n": [{"numeric": [">", 10]}]}}, body('{"n": [1, 2, 3]}'))
    assert passes({"body": {"r": [{"prefix": "us-"}]}}, body('{"r": ["eu-west-1", "us-east-1"]}'))
    assert passes({"body": {"n": [{"anything-but": [1]}]}}, body('{"n": [1, 2]}'))
    assert not passes({"body": {"n": [{"anything-but": [1]}]}}, body('{"n": [1, 1]}'))


def test_list_of_objects_matches_if_one_object_matches_the_whole_nested_pattern() -> None:
    pattern = {"body": {"items": {"sku": ["A1"], "qty": [{"numeric": [">=", 2]}]}}}
    assert passes(pattern, body('{"items": [{"sku": "B2", "qty": 1}, {"sku": "A1", "qty": 3}]}'))
    # Each key matching in a different element is not enough.
    assert not passes(pattern, body('{"items": [{"sku": "A1", "qty": 1}, {"sku": "B2", "qty": 3}]}'))
    assert not passes(pattern, body('{"items": ["A1", 3]}'))


# exists


@pytest.mark.parametrize(
    ("exists", "text", "expected"),
    [
        (True, '{"state": "on"}', True),
        (True, '{"state": null}', True),
        (True, '{"state": []}', True),
        (True, '{"other": 1}', False),
        (False, '{"state": "on"}', False),
        (False, '{"state": null}', False),
        (False, '{"other": 1}', True),
    ],
)
def test_exists_tests_whether_the_key_is_present(exists: bool, text: str, expected: bool) -> None:
    assert passes({"body": {"state": [{"exists": exists}]}}, body(text)) is expected


def test_exists_false_matches_when_the_parent_object_is_missing_too() -> None:
    assert passes({"body": {"order": {"coupon": [{"exists": False}]}}}, body('{"id": 1}'))
    assert passes({"body": {"coupon": [{"exists": False}]}}, {"subject": "s"})
    assert not passes({"body": {"order": {"coupon": [{"exists": True}]}}}, body('{"id": 1}'))


def test_exists_false_is_an_alternative_like_any_other() -> None:
    pattern = {"body": {"coupon": [{"exists": False}, "SPRING"]}}
    assert passes(pattern, body("{}"))
    assert passes(pattern, body('{"coupon": "SPRING"}'))
    assert not passes(pattern, body('{"coupon": "WINTER"}'))


# suffix, and anything-but with a prefix or suffix (EventBridge's operators)


def test_suffix_matches_strings_that_end_with_it() -> None:
    pattern = {"body": {"key": [{"suffix": ".jpg"}]}}
    assert passes(pattern, body('{"key": "photos/cat.jpg"}'))
    assert not passes(pattern, body('{"key": "photos/cat.jpg.tmp"}'))
    assert not passes(pattern, body('{"key": 1}'))
    assert passes({"body": {"k": [{"suffix": "b"}]}}, body('{"k": ["a", "ab"]}'))


def test_anything_but_suffix_passes_strings_ending_otherwise() -> None:
    pattern = {"body": {"key": [{"anything-but": {"suffix": [".tmp", ".part"]}}]}}
    assert passes(pattern, body('{"key": "a.jpg"}'))
    assert not passes(pattern, body('{"key": "a.tmp"}'))
    assert not passes(pattern, body('{"key": "a.part"}'))
    assert not passes(pattern, body('{"key": 3}')), "only strings are compared with a suffix"
    single = {"body": {"key": [{"anything-but": {"suffix": ".tmp"}}]}}
    assert passes(single, body('{"key": "a.jpg"}'))
    assert not passes(single, body('{"key": "a.tmp"}'))


def test_anything_but_prefix_passes_strings_starting_otherwise() -> None:
    pattern = {"body": {"key": [{"anything-but": {"prefix": "tmp/"}}]}}
    assert passes(pattern, body('{"key": "in/a"}'))
    assert not passes(pattern, body('{"key": "tmp/a"}'))


# anything-but


def test_anything_but_a_single_string() -> None:
    pattern = {"body": {"weather": [{"anything-but": "Raining"}]}}
    assert passes(pattern, body('{"weather": "Sunny"}'))
    assert not passes(pattern, body('{"weather": "Raining"}'))
    assert not passes(pattern, body("{}"))


def test_anything_but_a_list_of_strings() -> None:
    pattern = {"body": {"weather": [{"anything-but": ["Raining", "Snowing"]}]}}
    assert passes(pattern, body('{"weather": "Sunny"}'))
    assert passes(pattern, body('{"weather": "raining"}'))
    assert not passes(pattern, body('{"weather": "Raining"}'))
    assert not passes(pattern, body('{"weather": "Snowing"}'))


def test_anything_but_numbers_compares_json_text_and_type() -> None:
    criteria = compile_filters(['{"body": {"code": [{"anything-but": [300, 404]}]}}'], WHERE)
    assert not criteria.matches(body('{"code": 300}'))
    assert not criteria.matches(body('{"code": 404}'))
    assert criteria.matches(body('{"code": 301}'))
    assert criteria.matches(body('{"code": 300.0}'))
    assert criteria.matches(body('{"code": "300"}'))
    single = compile_filters([{"body": {"code": [{"anything-but": 300}]}}], WHERE)
    assert not single.matches(body('{"code": 300}'))
    assert single.matches(body('{"code": 200}'))


def test_anything_but_passes_null_and_bools() -> None:
    pattern = {"body": {"weather": [{"anything-but": ["Raining"]}]}}
    assert passes(pattern, body('{"weather": null}'))
    assert passes(pattern, body('{"weather": true}'))


# numeric


@pytest.mark.parametrize(
    ("comparison", "matching", "not_matching"),
    [
        (["=", 10], [10, 10.0], [9.99, 11]),
        ([">", 10], [10.5, 11, 1e9], [10, 9]),
        ([">=", 10], [10, 11], [9.999]),
        (["<", 10], [9, -5, 9.99], [10, 11]),
        (["<=", 10], [10, 0], [10.01]),
    ],
)
def test_numeric_single_comparison(comparison: list[Any], matching: list[float], not_matching: list[float]) -> None:
    pattern = {"body": {"n": [{"numeric": comparison}]}}
    for value in matching:
        assert passes(pattern, body(json.dumps({"n": value}))), value
    for value in not_matching:
        assert not passes(pattern, body(json.dumps({"n": value}))), value


@pytest.mark.parametrize(
    ("bounds", "inside", "outside"),
    [
        ([">", 10, "<=", 20], [10.001, 15, 20], [10, 20.001, -1]),
        ([">=", 10, "<", 20], [10, 19.999], [9.999, 20]),
        ([">=", 0, "<=", 0], [0, 0.0], [-0.001, 0.001]),
        (["<=", 20, ">", 10], [15, 20], [10, 21]),
    ],
)
def test_numeric_range_with_both_bounds(bounds: list[Any], inside: list[float], outside: list[float]) -> None:
    pattern = {"body": {"n": [{"numeric": bounds}]}}
    for value in inside:
        assert passes(pattern, body(json.dumps({"n": value}))), value
    for value in outside:
        assert not passes(pattern, body(json.dumps({"n": value}))), value


def test_numeric_compares_values_not_text() -> None:
    criteria = compile_filters(['{"body": {"n": [{"numeric": ["=", 3.0e2]}]}}'], WHERE)
    assert criteria.matches(body('{"n": 300}'))
    assert criteria.matches(body('{"n": 300.0}'))
    assert criteria.matches(body('{"n": 3e2}'))


@pytest.mark.parametrize("value", ['"15"', "true", "null", "[]", '{"v": 15}'])
def test_numeric_matches_only_numbers(value: str) -> None:
    assert not passes({"body": {"n": [{"numeric": [">", 10]}]}}, body(f'{{"n": {value}}}'))


def test_numeric_never_matches_nan() -> None:
    assert not passes({"n": [{"numeric": [">", 10]}]}, {"n": float("nan")})
    assert not passes({"n": [{"numeric": ["<", 10]}]}, {"n": float("nan")})


# prefix


def test_prefix_matches_strings_that_start_with_it() -> None:
    pattern = {"body": {"region": [{"prefix": "us-"}]}}
    assert passes(pattern, body('{"region": "us-east-1"}'))
    assert passes(pattern, body('{"region": "us-"}'))
    assert not passes(pattern, body('{"region": "eu-west-1"}'))
    assert not passes(pattern, body('{"region": "US-east-1"}'))


@pytest.mark.parametrize("value", ["123", "12.5", "true", "null", '["x"]', '{"v": "12"}'])
def test_prefix_never_matches_a_non_string(value: str) -> None:
    assert not passes(
        {"body": {"code": [{"prefix": "12"}, {"prefix": "t"}, {"prefix": "n"}]}}, body(f'{{"code": {value}}}')
    )


def test_operators_and_values_mix_in_one_leaf() -> None:
    pattern = {"body": {"v": ["exact", {"prefix": "pre"}, {"numeric": [">", 100]}, None]}}
    for text in ['"exact"', '"prefixed"', "101", "null"]:
        assert passes(pattern, body(f'{{"v": {text}}}')), text
    for text in ['"other"', "100", "false"]:
        assert not passes(pattern, body(f'{{"v": {text}}}')), text


# JSON-string and table patterns


@pytest.mark.parametrize(
    "pattern",
    [
        {"body": {"amount": [{"numeric": [">", 10, "<=", 20]}], "kind": ["a", "b"]}},
        {"subject": [{"prefix": "events.orders."}], "body": {"coupon": [{"exists": False}]}},
        {"body": {"state": [{"anything-but": ["x", 1]}, None, ""]}},
        {"headers": {"Nats-Msg-Id": [{"exists": True}]}},
    ],
)
def test_json_string_pattern_behaves_like_the_equivalent_table(pattern: dict[str, Any]) -> None:
    as_json = compile_filters([json.dumps(pattern)], WHERE)
    as_table = compile_filters([pattern], WHERE)
    documents = [
        body('{"amount": 15, "kind": "a"}'),
        body('{"amount": 25, "kind": "b", "coupon": "C"}'),
        body('{"state": null}'),
        body('{"state": "x"}'),
        body('{"state": "y"}'),
        body("plain"),
        {**body("{}"), "subject": "events.orders.created", "headers": {"Nats-Msg-Id": "1"}},
        {},
    ]
    assert [as_json.matches(d) for d in documents] == [as_table.matches(d) for d in documents]
    assert as_json.patterns == as_table.patterns


def test_duplicate_keys_in_a_json_pattern_last_one_wins() -> None:
    criteria = compile_filters(['{"kind": ["a"], "kind": ["b"]}'], WHERE)
    assert criteria.matches({"kind": "b"})
    assert not criteria.matches({"kind": "a"})


def test_keys_lists_the_top_level_keys_patterns_name() -> None:
    criteria = compile_filters([{"body": {"a": ["1"]}}, {"subject": ["s"], "headers": {"h": ["v"]}}], WHERE)
    assert criteria.keys == {"body", "subject", "headers"}
    assert Filter().keys == frozenset()


# decode_body


def test_decode_body_returns_json_values_or_the_text() -> None:
    assert decode_body(b'{"a": [1, "x", null]}') == {"a": [1, "x", None]}
    assert decode_body('"quoted"') == "quoted"
    assert decode_body(b"not json") == "not json"
    assert decode_body("{broken") == "{broken"
    assert decode_body(b"\xff\xfe{") == "\ufffd\ufffd{"
    assert decode_body(b'{"n": NaN}') == '{"n": NaN}'


def test_decode_body_keeps_number_text() -> None:
    decoded = decode_body(b'{"a": 3.0e2, "b": 300.0}')
    assert decoded == {"a": 300.0, "b": 300.0}
    assert repr(decoded["a"]) == "3.0e2"
    assert json.dumps(decoded) == '{"a": 300.0, "b": 300.0}'


# Compile errors


@pytest.mark.parametrize(
    ("pattern", "path", "problem"),
    [
        ('{"a": [1', "at $:", "invalid JSON at line 1 column 9"),
        ('{"a": [NaN]}', "at $:", "NaN is not valid JSON"),
        ("[1, 2]", "at $:", "a pattern must be an object, not a list"),
        ('"a"', "at $:", 'a pattern must be an object, not the string "a"'),
        (42, "at $:", "a pattern must be an object, not the number 42"),
        ({}, "at $:", "an empty object"),
        ({"body": {}}, "at $.body:", "an empty object"),
        ({"body": {"amount": 5}}, "at $.body.amount:", "the number 5 where a list of alternatives"),
        ({"body": {"amount": "5"}}, "at $.body.amount:", 'the string "5" where a list of alternatives'),
        ({"body": {"amount": []}}, "at $.body.amount:", "an empty list matches nothing"),
        ({"body": {"amount": [1, [2]]}}, "at $.body.amount[1]:", "a list inside a list of alternatives"),
        ({"body": {"amount": [{"prefx": "a"}]}}, "at $.body.amount[0]:", "unknown operator 'prefx'"),
        ({"body": {"amount": [{"wildcard": "a*"}]}}, "at $.body.amount[0]:", "unknown operator 'wildcard'"),
        ({"a": [{"prefix": "x", "exists": True}]}, "at $.a[0]:", "exactly one key, this one has 2"),
        ({"a": [{}]}, "at $.a[0]:", "exactly one key, this one has 0"),
        ({"a": [{"prefix": 1}]}, "at $.a[0].prefix:", "prefix takes a string, not the number 1"),
        ({"a": [{"exists": "yes"}]}, "at $.a[0].exists:", 'exists takes true or false, not the string "yes"'),
        ({"a": [{"anything-but": []}]}, 'at $.a[0]["anything-but"]:', "an empty list excludes nothing"),
        ({"a": [{"anything-but": ["x", None]}]}, 'at $.a[0]["anything-but"][1]:', "strings or numbers, not null"),
        ({"a": [{"anything-but": True}]}, 'at $.a[0]["anything-but"]:', "strings or numbers, not true"),
        ({"a": [{"numeric": [">"]}]}, "at $.a[0].numeric:", "one or two (operator, number) pairs"),
        ({"a": [{"numeric": 5}]}, "at $.a[0].numeric:", "one or two (operator, number) pairs"),
        ({"a": [{"numeric": [">", 1, "<"]}]}, "at $.a[0].numeric:", "one or two (operator, number) pairs"),
        ({"a": [{"numeric": ["!", 1]}]}, "at $.a[0].numeric[0]:", 'the string "!" is not a comparison'),
        ({"a": [{"numeric": [">", "1"]}]}, "at $.a[0].numeric[1]:", 'with a number, not the string "1"'),
        ({"a": [{"numeric": [">", True]}]}, "at $.a[0].numeric[1]:", "with a number, not true"),
        ({"a": [{"numeric": [">", 1, ">", 2]}]}, "at $.a[0].numeric:", "a lower bound (> or >=) and an upper"),
        ({"a": [{"numeric": ["=", 1, "<", 2]}]}, "at $.a[0].numeric:", "a lower bound (> or >=) and an upper"),
        ({"a": [{"numeric": [">", 5, "<", 5]}]}, "at $.a[0].numeric:", "the range > 5 and < 5 is empty"),
        ({"a": [{"numeric": [">=", 9, "<=", 1]}]}, "at $.a[0].numeric:", "the range >= 9 and <= 1 is empty"),
        ({"a": [{"numeric": [">", float("inf")]}]}, "at $.a[0].numeric[1]:", "inf is not a JSON number"),
        ({"a": [float("nan")]}, "at $.a[0]:", "nan is not a JSON number"),
        ({"my key": ["x", {"nope": 1}]}, 'at $["my key"][1]:', "unknown operator 'nope'"),
        ({"a": [datetime.date(2024, 1, 1)]}, "at $.a[0]:", "a value of type date is not a JSON value"),
        ({"a": [{"suffix": 1}]}, "at $.a[0].suffix:", "suffix takes a string, not the number 1"),
        ({"a": [{"anything-but": {"wildcard": "x"}}]}, 'at $.a[0]["anything-but"]:', "one key: prefix or suffix"),
        ({"a": [{"anything-but": {"suffix": []}}]}, 'at $.a[0]["anything-but"].suffix:', "an empty list excludes"),
        ({"a": [{"anything-but": {"prefix": ["x", ""]}}]}, 'at $.a[0]["anything-but"].prefix[1]:', "non-empty"),
    ],
)
def test_malformed_pattern_is_a_config_error_naming_the_json_path(pattern: object, path: str, problem: str) -> None:
    message = compile_error(pattern)
    assert message.startswith(f"{WHERE}: patterns[0] {path} ")
    assert problem in message
    # Every message ends with a fix in parentheses.
    assert re.search(r"\(.+\)$", message), message


def test_unknown_operator_error_suggests_the_closest_operator() -> None:
    message = compile_error({"body": {"amount": [{"numerc": [">", 1]}]}})
    assert "did you mean 'numeric'?" in message
    assert "anything-but, exists, numeric, prefix" in message


def test_error_names_which_pattern_is_wrong() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{WHERE}: patterns[2] at $.b[0].exists:")):
        compile_filters([{"a": ["x"]}, '{"a": ["y"]}', {"b": [{"exists": 1}]}], WHERE)


def test_error_is_a_config_error_with_where_set() -> None:
    with pytest.raises(ConfigError) as info:
        compile_filters(["{"], WHERE)
    assert info.value.where == WHERE


def test_at_most_five_patterns() -> None:
    five = [{"n": [i]} for i in range(MAX_PATTERNS)]
    assert MAX_PATTERNS == 5
    assert compile_filters(five, WHERE).matches({"n": 4})
    with pytest.raises(ConfigError, match=re.escape(f"{WHERE}: 6 filter patterns, more than Lambda's limit of 5")):
        compile_filters([*five, {"n": [5]}], WHERE)


@pytest.mark.parametrize("patterns", ['{"a": ["x"]}', {"a": ["x"]}])
def test_a_single_pattern_not_in_a_list_is_a_config_error(patterns: Any) -> None:
    with pytest.raises(ConfigError, match="filters must be a list of patterns"):
        compile_filters(patterns, WHERE)
