"""Routing rules: every operator, both match forms, error messages, and a reference property.

The property test builds random expressions together with an independent evaluation of the
documented semantics, so the parser, the precedence and the value comparisons are all checked
against something that is not the code under test.
"""
from __future__ import annotations

import fnmatch
import operator
import pickle
import re
import textwrap
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from pydicom.datadict import tag_for_keyword

from fastroute.config import Config, RuleConfig, loads
from fastroute.errors import ConfigError, RuleSyntaxError
from fastroute.routing.rules import (
    NOT_EVALUATED, CompiledRule, RouteDecision, RuleSet, compile_rule,
)
from fastroute.rulelang import ExpressionError, compile_match


def T(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return tag


MODALITY, SERIES, THICK, IMAGE_TYPE, DESC = (
    T("Modality"), T("SeriesNumber"), T("SliceThickness"), T("ImageType"), T("StudyDescription"))
ACCESSION, STUDY_DATE, STATION_AE = T("AccessionNumber"), T("StudyDate"), T("StationAETitle")
PRIVATE = 0x00091001
CTX = {"calling_ae": "CT1", "called_ae": "FASTROUTE", "peer_ip": "10.1.2.3"}


def rule(match: Any, name: str = "r", send_to: tuple[str, ...] = ("a",),
         stop: bool = False) -> CompiledRule:
    return compile_rule(RuleConfig(name, match, send_to, stop))


def hit(match: Any, attrs: dict[int, Any] | None = None, **ctx: str) -> bool:
    return rule(match).matches(attrs or {}, {**CTX, **ctx})


def syntax_error(match: Any) -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as info:
        rule(match)
    return info.value


# -- operators ----------------------------------------------------------------------------------

CT: dict[int, Any] = {MODALITY: "CT", SERIES: 5, THICK: 2.5, DESC: "HEAD BRAIN",
                      STUDY_DATE: "20240315"}


@pytest.mark.parametrize("expr, expected", [
    ('Modality == "CT"', True),
    ('Modality == "ct"', False),                       # exact, case-sensitive
    ("Modality == 'CT'", True),
    ('Modality != "CT"', False),
    ('Modality != "MR"', True),
    ("SeriesNumber == 5", True),
    ("SeriesNumber == 5.0", True),
    ('SeriesNumber == "5"', True),                     # numeric attribute: literal converted
    ("SeriesNumber < 6", True),
    ("SeriesNumber <= 5", True),
    ("SeriesNumber > 5", False),
    ("SeriesNumber >= 5", True),
    ("SliceThickness > 2", True),
    ("SliceThickness < -1", False),
    ('StudyDate >= "20240101"', True),                 # lexical on strings, fits DA values
    ('StudyDate < "20240101"', False),
    ("StudyDate > 20240000", True),                    # numeric literal: attribute as float
    ('Modality in ["MR", "CT"]', True),
    ('Modality in ["MR", "PT",]', False),
    ('Modality not in ["MR", "PT"]', True),
    ("SeriesNumber in [1, 5, 9]", True),
    ('SeriesNumber in ["5"]', True),
    ('StudyDescription matches "*BRAIN*"', True),
    ('StudyDescription matches "*brain*"', False),     # fnmatchcase: case-sensitive
    ('StudyDescription matches "HEAD?BRAIN"', True),
    ('StudyDescription matches "[GH]EAD*"', True),
    ('StudyDescription matches "BRAIN"', False),       # a glob matches the whole value
    ('StudyDescription not matches "*BRAIN*"', False),
    ('StudyDescription matches_regex "BRA.N"', True),  # re.search: anywhere in the value
    ('StudyDescription ~= "^BRAIN"', False),
    ('StudyDescription not matches_regex "^BRAIN"', True),
    ('StudyDescription ~= "\\d"', False),
    ('SeriesNumber ~= "^5$"', True),                   # numbers are searched as str()
    ('SeriesNumber matches "5*"', True),
    ("AccessionNumber missing", True),
    ("AccessionNumber exists", False),
    ("Modality exists", True),
    ("Modality missing", False),
    ("true", True),
    ("false", False),
    ("TRUE and not FALSE", True),
])
def test_operator(expr: str, expected: bool) -> None:
    assert hit(expr, CT) is expected


def test_keywords_are_case_insensitive() -> None:
    assert hit('Modality == "CT" AND NOT calling_ae In ["X"] Or false', CT)
    assert hit('StudyDescription MATCHES "*BRAIN*" and Modality Not IN ["MR"]', CT)
    assert hit("AccessionNumber MISSING and Modality Exists", CT)


def test_string_escapes() -> None:
    assert hit(r'StudyDescription == "say \"hi\""', {DESC: 'say "hi"'})
    assert hit(r"StudyDescription == 'it\'s'", {DESC: "it's"})
    assert hit(r'StudyDescription == "a\\b"', {DESC: "a\\b"})
    assert hit(r'StudyDescription == "tab\there"', {DESC: "tab\there"})
    # An unknown escape is kept as written, so regexes need no doubling.
    assert hit(r'AccessionNumber ~= "^\d+$"', {ACCESSION: "12345"})
    assert not hit(r'AccessionNumber ~= "^\d+$"', {ACCESSION: "A12345"})


# -- precedence and grouping --------------------------------------------------------------------

@pytest.mark.parametrize("a", [False, True])
@pytest.mark.parametrize("b", [False, True])
@pytest.mark.parametrize("c", [False, True])
def test_precedence(a: bool, b: bool, c: bool) -> None:
    attrs = {tag: "x" for tag, present in ((MODALITY, a), (SERIES, b), (DESC, c)) if present}
    A, B, C = "Modality exists", "SeriesNumber exists", "StudyDescription exists"
    assert hit(f"not {A} or {B} and {C}", attrs) is ((not a) or (b and c))
    assert hit(f"{A} or {B} and {C}", attrs) is (a or (b and c))
    assert hit(f"{A} and {B} or {C}", attrs) is ((a and b) or c)
    assert hit(f"(not {A} or {B}) and {C}", attrs) is (((not a) or b) and c)
    assert hit(f"not ({A} or {B}) and {C}", attrs) is ((not (a or b)) and c)
    assert hit(f"not not {A}", attrs) is a
    assert hit(f"((({A})))", attrs) is a


def test_not_binds_looser_than_comparison() -> None:
    assert hit('not Modality == "MR"', CT)
    assert not hit('not Modality == "CT"', CT)


# -- multi-valued, missing, empty, bytes --------------------------------------------------------

IMG = {IMAGE_TYPE: ("ORIGINAL", "PRIMARY", "AXIAL"), T("WindowCenter"): (40.0, 400.0)}


@pytest.mark.parametrize("expr, expected", [
    ('ImageType == "PRIMARY"', True),          # any value
    ('ImageType == "DERIVED"', False),
    ('ImageType != "PRIMARY"', False),         # none equal
    ('ImageType != "DERIVED"', True),
    ('ImageType in ["DERIVED", "AXIAL"]', True),
    ('ImageType not in ["DERIVED", "AXIAL"]', False),
    ('ImageType matches "PRIM*"', True),
    ('ImageType ~= "^AX"', True),
    ("WindowCenter > 100", True),
    ("WindowCenter < 10", False),
    ("WindowCenter == 40", True),
])
def test_multi_valued(expr: str, expected: bool) -> None:
    assert hit(expr, IMG) is expected


@pytest.mark.parametrize("expr, expected", [
    ('AccessionNumber == "A1"', False),
    ('AccessionNumber != "A1"', True),
    ('AccessionNumber in ["A1"]', False),
    ('AccessionNumber not in ["A1"]', True),
    ('AccessionNumber matches "*"', False),
    ('AccessionNumber not matches "*"', True),
    ('AccessionNumber ~= ""', False),
    ("AccessionNumber < 5", False),
    ("AccessionNumber >= 5", False),
    ("AccessionNumber missing", True),
    ("AccessionNumber exists", False),
    ('called_ae == "FASTROUTE"', False),        # context key absent below
    ("called_ae missing", True),
])
def test_missing_attribute(expr: str, expected: bool) -> None:
    assert rule(expr).matches({MODALITY: "CT"}, {"calling_ae": "CT1"}) is expected


@pytest.mark.parametrize("empty", ["", (), b"", b"\x00", "  "])
def test_empty_value_counts_as_missing(empty: Any) -> None:
    assert hit("AccessionNumber missing", {ACCESSION: empty})
    assert not hit("AccessionNumber exists", {ACCESSION: empty})
    assert not hit('AccessionNumber == "A1"', {ACCESSION: empty})


def test_zero_is_present() -> None:
    assert hit("SeriesNumber exists", {SERIES: 0})
    assert hit("SliceThickness exists", {THICK: 0.0})


def test_bytes_values_compare_as_text() -> None:
    attrs = {PRIVATE: b"RESEARCH\x00"}
    assert hit('(0009,1001) == "RESEARCH"', attrs)
    assert hit('(0009,1001) matches "RES*"', attrs)
    assert hit("(0009,1001) exists", attrs)
    assert hit('(0009,1001) in ["X", "Y"]', {PRIVATE: (b"X ", b"Z")})


# -- numbers and strings ------------------------------------------------------------------------

@pytest.mark.parametrize("expr, value, expected", [
    ("AccessionNumber == 12", "12", True),        # string attribute, numeric literal
    ("AccessionNumber == 12", "0012", True),
    ("AccessionNumber == 12", "12.0", True),
    ("AccessionNumber == 12", "A12", False),      # not numeric: no match, no error
    ("AccessionNumber < 5", "ABC", False),
    ("AccessionNumber != 5", "ABC", True),
    ('AccessionNumber == "12"', "12.0", False),   # both strings: exact
    ('AccessionNumber == "12"', 12, True),        # numeric attribute: literal converted
    ('AccessionNumber == "ABC"', 12, False),
    ('AccessionNumber < "ABC"', 12, False),
    ('AccessionNumber < "20"', 12, True),         # numeric, not lexical ("12" < "20" anyway)
    ('AccessionNumber < "3"', 12, False),         # lexically "12" < "3"; numerically not
    ('AccessionNumber < "3"', "12", True),        # both strings: lexical
    ("AccessionNumber in [1, 12]", "12", True),
    ('AccessionNumber in ["1", 12]', "12.0", True),
    ("AccessionNumber == 1e3", "1000", True),
    ("AccessionNumber == -3", "-3", True),
    ("AccessionNumber == .5", "0.5", True),
    ("AccessionNumber == 5", "nan", False),       # nan/inf are not DICOM numbers
])
def test_numeric_vs_string(expr: str, value: Any, expected: bool) -> None:
    assert hit(expr, {ACCESSION: value}) is expected


# -- AE titles ----------------------------------------------------------------------------------

def test_ae_titles_compare_stripped() -> None:
    padded = "  CT1        "
    assert hit('calling_ae == "CT1"', calling_ae=padded)
    assert hit('calling_ae == " CT1 "', calling_ae=padded)
    assert hit('calling_ae in ["MR1", "CT1  "]', calling_ae=padded)
    assert hit('calling_ae matches "CT?"', calling_ae=padded)
    assert hit('calling_ae ~= "1$"', calling_ae=padded)
    assert not hit('calling_ae == "ct1"', calling_ae=padded)   # still case-sensitive
    assert hit('called_ae == "FASTROUTE"', called_ae="FASTROUTE       ")
    # An attribute of VR AE behaves the same, other text does not.
    assert hit('StationAETitle == "PACS"', {STATION_AE: " PACS "})
    assert not hit('StudyDescription == "PACS"', {DESC: " PACS "})


def test_calling_ae_blank_is_missing() -> None:
    assert hit("calling_ae missing", calling_ae="   ")


# -- peer_ip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, peer, expected", [
    ('peer_ip in "10.0.0.0/8"', "10.1.2.3", True),
    ('peer_ip in "10.0.0.0/8"', "11.1.2.3", False),
    ('peer_ip not in "10.0.0.0/8"', "11.1.2.3", True),
    ('peer_ip in ["192.168.0.0/16", "10.0.0.0/8"]', "10.1.2.3", True),
    ('peer_ip in ["192.168.0.0/16", "172.16.0.7"]', "172.16.0.7", True),
    ('peer_ip in ["192.168.0.0/16", "172.16.0.7"]', "172.16.0.8", False),
    ('peer_ip in "10.0.0.0/8"', "::ffff:10.9.9.9", True),      # IPv4-mapped IPv6
    ('peer_ip in "fd00::/8"', "fd12::1", True),
    ('peer_ip in "fd00::/8"', "10.1.2.3", False),
    ('peer_ip in "10.0.0.0/8"', "not-an-address", False),
    ('peer_ip == "10.1.2.3"', "10.1.2.3", True),
    ('peer_ip == "10.1.2.3"', "10.1.2.4", False),
    ('peer_ip != "10.1.2.3"', "10.1.2.4", True),
    ('peer_ip == "::1"', "0:0:0:0:0:0:0:1", True),            # compared as addresses
    ('peer_ip matches "10.*"', "10.1.2.3", True),
])
def test_peer_ip(expr: str, peer: str, expected: bool) -> None:
    assert hit(expr, peer_ip=peer) is expected
    assert hit(expr, peer_ip=peer) is expected      # again: answers are remembered per peer


def test_peer_ip_missing() -> None:
    assert rule('peer_ip in "10.0.0.0/8"').matches({}, {}) is False
    assert rule('peer_ip not in "10.0.0.0/8"').matches({}, {}) is True


@pytest.mark.parametrize("expr, fragment", [
    ('peer_ip == "10.0.0.0/8"', "use: peer_ip in"),
    ('peer_ip in ["10.0.0.0/33"]', "IP networks or addresses"),
    ('peer_ip in ["nowhere"]', "IP networks or addresses"),
    ("peer_ip in [10]", "IP networks or addresses"),
    ('peer_ip == "host.example"', "needs an IP address"),
    ('peer_ip < "10.0.0.1"', "cannot be compared"),
])
def test_peer_ip_errors(expr: str, fragment: str) -> None:
    assert fragment in str(syntax_error(expr))


# -- private tags and identifiers ---------------------------------------------------------------

def test_private_tag_identifiers() -> None:
    attrs = {PRIVATE: "RESEARCH", 0x00091002: ("A", "B")}
    assert hit('(0009,1001) == "RESEARCH"', attrs)
    assert hit('( 0009 , 1001 ) == "RESEARCH"', attrs)
    assert hit('0x00091001 == "RESEARCH"', attrs)
    assert hit('0X00091001 ~= "^RES"', attrs)
    assert hit('(0009,1002) == "B"', attrs)
    assert rule('(0009,1001) == "X" or (0009,1002) exists').tags == {PRIVATE, 0x00091002}


def test_tag_spelling_of_standard_attribute_is_the_same_attribute() -> None:
    assert hit('(0008,0060) == "CT"', CT)
    assert hit('(0008,0060) == "CT"', CT) == hit('Modality == "CT"', CT)


def test_tags_exclude_context_names() -> None:
    r = rule('Modality == "CT" and calling_ae == "X" and peer_ip in "10.0.0.0/8"')
    assert r.tags == {MODALITY}


def test_no_python_evaluation() -> None:
    for expr in ("__import__('os').system('true')", "Modality.__class__ == 1",
                 "(lambda: 1)() == 1", "[x for x in Modality]"):
        with pytest.raises(RuleSyntaxError):
            rule(expr)


# -- mapping form -------------------------------------------------------------------------------

def test_mapping_form_all_keys_must_hold() -> None:
    r = rule({"Modality": "CT", "calling_ae": "CT1"})
    assert r.matches({MODALITY: "CT"}, {"calling_ae": "CT1"})
    assert r.matches({MODALITY: "CT"}, {"calling_ae": "CT1    "})
    assert not r.matches({MODALITY: "CT"}, {"calling_ae": "CT2"})
    assert not r.matches({MODALITY: "MR"}, {"calling_ae": "CT1"})
    assert not r.matches({}, {"calling_ae": "CT1"})
    assert r.tags == {MODALITY}


def test_mapping_form_lists_are_any_of() -> None:
    r = rule({"Modality": ["CT", "PT"], "calling_ae": ["CT1", "CT2"]})
    assert r.matches({MODALITY: "PT"}, {"calling_ae": "CT2"})
    assert not r.matches({MODALITY: "MR"}, {"calling_ae": "CT2"})
    assert r.matches({MODALITY: ("OT", "CT")}, {"calling_ae": "CT1"})


def test_mapping_form_glob_characters_are_literal() -> None:
    r = rule({"StudyDescription": "*BRAIN*"})
    assert not r.matches({DESC: "HEAD BRAIN"}, {})
    assert r.matches({DESC: "*BRAIN*"}, {})


def test_mapping_form_numbers_tags_and_networks() -> None:
    assert hit({"SeriesNumber": 5}, {SERIES: 5})
    assert hit({"StudyDate": 20240315}, {STUDY_DATE: "20240315"})   # YAML made it an int
    assert hit({"(0009,1001)": "X"}, {PRIVATE: "X"})
    assert hit({0x00091001: "X"}, {PRIVATE: "X"})                   # YAML reads 0x... as int
    assert hit({"peer_ip": "10.0.0.0/8"}, peer_ip="10.2.3.4")
    assert not hit({"peer_ip": ["192.168.0.0/16", "172.16.0.1"]}, peer_ip="10.2.3.4")


def test_mapping_form_empty_and_none_always_match() -> None:
    assert hit({}, {})
    assert hit(None, {})
    assert rule(None).tags == frozenset()


@pytest.mark.parametrize("match, fragment", [
    ({"Modalty": "CT"}, "did you mean 'Modality'"),
    ({"Modality": True}, "quote the value"),
    ({"Modality": None}, "Modality missing"),
    ({"Modality": {"a": 1}}, "text or a number"),
    ({"Modality": []}, "empty list"),
    ({"Modality": [["CT"]]}, "text or a number"),
    ({"peer_ip": "nowhere"}, "IP networks"),
    ({0x1_0000_0000: "X"}, "out of range"),
    (42, "match must be"),
])
def test_mapping_form_errors(match: Any, fragment: str) -> None:
    assert fragment in str(syntax_error(match))


# -- rule sets ----------------------------------------------------------------------------------

def ruleset(*rules: RuleConfig, default: tuple[str, ...] = ()) -> RuleSet:
    return RuleSet.from_config(Config(rules=rules, default=default))


def test_all_matching_rules_apply_in_order_deduplicated() -> None:
    rs = ruleset(
        RuleConfig("ct", {"Modality": "CT"}, ("pacs", "vna")),
        RuleConfig("brain", 'StudyDescription matches "*BRAIN*"', ("vna", "research")),
        RuleConfig("mr", {"Modality": "MR"}, ("mr-archive",)),
    )
    d = rs.route(CT, CTX)
    assert d == RouteDecision(("pacs", "vna", "research"), ("ct", "brain"), False)
    assert rs.route(CT, CTX) is d                # decisions are built once per combination


def test_stop_ends_evaluation() -> None:
    rs = ruleset(
        RuleConfig("first", "true", ("a",)),
        RuleConfig("ct", {"Modality": "CT"}, ("pacs",), stop=True),
        RuleConfig("later", "true", ("b",)),
    )
    assert rs.route(CT, CTX) == RouteDecision(("a", "pacs"), ("first", "ct"), False)
    # A rule with stop: true that does not match does not stop anything.
    assert rs.route({MODALITY: "MR"}, CTX) == RouteDecision(("a", "b"), ("first", "later"), False)


def test_default_route_and_unrouted() -> None:
    rules = (RuleConfig("ct", {"Modality": "CT"}, ("pacs",)),)
    assert ruleset(*rules, default=("catchall",)).route({MODALITY: "MR"}, CTX) == \
        RouteDecision(("catchall",), (), True)
    unrouted = ruleset(*rules).route({MODALITY: "MR"}, CTX)
    assert unrouted == RouteDecision((), (), True)
    assert ruleset().route({}, {}) == RouteDecision((), (), True)
    # The default applies only when nothing matched.
    assert ruleset(*rules, default=("catchall",)).route(CT, CTX).destinations == ("pacs",)


def test_ruleset_tags_sorted_union() -> None:
    rs = ruleset(
        RuleConfig("a", 'StudyDescription == "x" and calling_ae == "y"', ("d",)),
        RuleConfig("b", {"Modality": "CT", "(0009,1001)": "z"}, ("d",)),
        RuleConfig("c", None, ("d",)),
    )
    assert rs.tags == tuple(sorted({DESC, MODALITY, PRIVATE}))


def test_explain() -> None:
    rs = ruleset(
        RuleConfig("mr", {"Modality": "MR"}, ("vna",)),
        RuleConfig("ct", 'Modality == "CT"', ("pacs",), stop=True),
        RuleConfig("all", None, ("b",)),
        default=("fallback",),
    )
    traces = rs.explain(CT, CTX)
    assert [(t.rule, t.matched) for t in traces] == [
        ("mr", False), ("ct", True), ("all", NOT_EVALUATED), ("(default)", False)]
    assert traces[-1].decision == rs.route(CT, CTX) == RouteDecision(("pacs",), ("ct",), False)
    assert traces[0].source == 'Modality == "MR"'
    lines = [str(t) for t in traces]
    assert lines[1].startswith("ct: MATCH") and "(stop)" in lines[1]
    assert NOT_EVALUATED in lines[2]
    assert lines[-1] == "=> pacs (by rules ct)"
    fallback = ruleset(RuleConfig("mr", {"Modality": "MR"}, ("vna",)), default=("fallback",))
    nothing = fallback.explain({MODALITY: "US"}, CTX)
    assert [(t.rule, t.matched) for t in nothing] == [("mr", False), ("(default)", True)]
    assert nothing[-1].decision == RouteDecision(("fallback",), (), True)
    assert str(nothing[-1]) == "=> fallback (by default)"
    assert str(ruleset().explain({}, {})[-1]) == "=> unrouted (kept in spool) (by default)"


# -- syntax errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, fragment", [
    ("Modality == and x", "expected a value after '==', got 'and' at column 13: Modality == and x"),
    ("Modality ==", "expected a value after '==', got the end of the expression at column 12 "
                    "(end of expression): Modality =="),
    ('Modality = "CT"', "unexpected character '=' at column 10"),
    ('Modality == "CT" && calling_ae == "X"', "unexpected character '&' at column 18"),
    ('Modality == "CT"  SeriesNumber == 1', "expected 'and', 'or' or the end of the expression, "
                                            "got 'SeriesNumber' at column 19"),
    ('(Modality == "CT"', "expected ')' to close the '(' at column 1"),
    ('Modality == "CT")', "unmatched ')' at column 17"),
    ("Modality", "expected an operator after 'Modality'"),
    ('Modality is "CT"', "expected an operator after 'Modality', got 'is' at column 10"),
    ('"CT" == Modality', "expected an attribute, 'not' or '(', got '\"CT\"' at column 1"),
    ('Modality == "CT', "unterminated string at column 13"),
    ('Modality in "CT"', "expected a list [...] after 'in'"),
    ('Modality in ["CT" "MR"]', "expected ',' or ']' in the list, got '\"MR\"' at column 19"),
    ("Modality in []", "an empty list never matches at column 13"),
    ('Modality not == "CT"', "expected 'in', 'matches' or 'matches_regex' after 'not'"),
    ("Modality matches CT", "expected a quoted pattern after 'matches'"),
    ("Modality == CT", "expected a value after '==', got 'CT'"),
    ("Modality == true", "expected a value after '=='"),
    ("StudyInstanceUID == 1.2.840", "malformed number"),
    ("0x0009100 == 1", "needs exactly 8 hex digits"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("(" * 100 + "true" + ")" * 100, "nested too deeply"),
])
def test_syntax_errors(expr: str, fragment: str) -> None:
    err = syntax_error(expr)
    assert isinstance(err, ConfigError)
    assert fragment in str(err), str(err)


def test_error_quotes_multiline_expression_on_one_line() -> None:
    err = syntax_error('Modality == "CT"\n  and SeriesNumber >')
    assert 'at column 38 (end of expression): Modality == "CT"   and SeriesNumber >' in str(err)


@pytest.mark.parametrize("expr, suggestion", [
    ('Modalty == "CT"', "'Modality'"),
    ('modality == "CT"', "'Modality'"),
    ('StudyDescripton matches "*"', "'StudyDescription'"),
    ('calling_aet == "X"', "'calling_ae'"),
    ('peerip in "10.0.0.0/8"', "'peer_ip'"),
])
def test_unknown_identifier_did_you_mean(expr: str, suggestion: str) -> None:
    err = syntax_error(expr)
    assert "unknown attribute" in str(err) and "at column 1" in str(err)
    assert err.hint.startswith("did you mean") and suggestion in err.hint


def test_unknown_identifier_without_suggestion_explains_identifiers() -> None:
    err = syntax_error('Qzxwv == "CT"')
    assert "unknown attribute 'Qzxwv'" in str(err)
    assert "(0009,1001)" in err.hint and "calling_ae" in err.hint


@pytest.mark.parametrize("expr", [
    'StudyDescription ~= "("', 'StudyDescription matches_regex "[a-"', 'Modality ~= "*x"'])
def test_bad_regex_is_a_compile_error(expr: str) -> None:
    err = syntax_error(expr)
    assert "bad regular expression" in str(err) and "at column" in str(err)


def test_error_names_rule_and_line() -> None:
    err = syntax_error("Modality ==")
    assert err.key == "rules[r].match"
    with pytest.raises(RuleSyntaxError) as info:
        compile_rule(RuleConfig("ct", "Modality ==", ("a",), line=7))
    assert info.value.line == 7 and str(info.value).startswith("<config>:7: rules[ct].match: ")


# -- configuration loading ----------------------------------------------------------------------

CONFIG = textwrap.dedent("""\
    destinations:
      pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}
      vna: {ae_title: VNA, host: 127.0.0.1, port: 104}
    rules:
      - name: ct-to-pacs-and-vna
        match: {Modality: CT, calling_ae: CT1}
        send_to: [pacs, vna]
      - name: mr
        match: 'Modality == "MR" and StudyDescription matches "*BRAIN*"'
        send_to: [vna]
      - name: private
        match:
          (0009,1001): RESEARCH
          0x00091002: [A, B]
        send_to: vna
        stop: true
    default: []
    """)


def test_config_round_trip() -> None:
    rs = RuleSet.from_config(loads(CONFIG))
    assert rs.route({MODALITY: "CT"}, {"calling_ae": "CT1"}).destinations == ("pacs", "vna")
    assert rs.route({MODALITY: "MR", DESC: "BRAIN"}, {}).matched == ("mr",)
    assert rs.route({PRIVATE: "RESEARCH", 0x00091002: "B"}, {}).matched == ("private",)
    assert rs.route({MODALITY: "US"}, {}) == RouteDecision((), (), True)
    assert rs.tags == tuple(sorted({MODALITY, DESC, PRIVATE, 0x00091002}))


def test_config_invalid_expression_names_the_line() -> None:
    text = CONFIG.replace('"*BRAIN*"', '*BRAIN*')
    with pytest.raises(ConfigError) as info:
        loads(text, "router.yaml")
    msg = str(info.value)
    assert msg.startswith("router.yaml:9: rules[1].match: unexpected character '*' at column 47: "
                          "Modality == \"MR\" and StudyDescription matches *BRAIN*"), msg
    assert 'hint: quote patterns' in msg


def test_config_unknown_mapping_key_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        loads(CONFIG.replace("{Modality: CT,", "{Modalty: CT,"), "router.yaml")
    assert str(info.value).startswith("router.yaml:6: rules[0].match: unknown attribute 'Modalty'")
    assert "did you mean 'Modality'" in str(info.value)


def test_config_yaml_boolean_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="quote the value"):
        loads(CONFIG.replace("calling_ae: CT1", "calling_ae: on"))


def test_config_expression_error_is_a_rule_syntax_error_with_the_match_line() -> None:
    text = CONFIG.replace("(0009,1001): RESEARCH", "(0009,1001: RESEARCH")
    with pytest.raises(RuleSyntaxError) as info:
        loads(text, "router.yaml")
    assert (info.value.line, info.value.key) == (13, "rules[2].match")


# -- the language on its own, and compiling once ------------------------------------------------

def test_language_compiles_without_a_config() -> None:
    """``fastroute.rulelang`` is below config: it takes a bare match and knows no rule or file."""
    m = compile_match('Modality in ["CT", "MR"] and (0009,1001) exists')
    assert m.tags == frozenset({MODALITY, PRIVATE}) and m.source.startswith("Modality in")
    assert m.predicate({MODALITY: "MR", PRIVATE: "x"}, {}) and not m.predicate({MODALITY: "MR"}, {})
    with pytest.raises(ExpressionError) as info:
        compile_match("Modalty == 1")
    assert info.value.message == "unknown attribute 'Modalty' at column 1: Modalty == 1"
    assert info.value.hint == "did you mean 'Modality'?"


def test_compiled_rule_takes_the_rules_matcher() -> None:
    cfg = RuleConfig("ct", {"Modality": "CT"}, ("pacs",), line=3)
    compiled = compile_rule(cfg)
    assert compiled.matches is cfg.matcher.predicate and compiled.tags == cfg.matcher.tags
    assert (compiled.source, compiled.line) == ('Modality == "CT"', 3)


def test_handed_over_matcher_is_used_only_for_its_own_match() -> None:
    m = compile_match('Modality == "CT"')
    assert RuleConfig("r", m.match, ("a",), compiled=m).matcher is m
    other = RuleConfig("r", 'Modality == "MR"', ("a",), compiled=m)
    assert other.matcher is not m and other.matcher.predicate({MODALITY: "MR"}, {})


def test_matcher_pickles_as_its_match_and_compiles_on_load() -> None:
    m = compile_match({"Modality": ["CT", "MR"], "peer_ip": "10.0.0.0/8"})
    again = pickle.loads(pickle.dumps(m))
    assert again == m and again.predicate is not m.predicate
    assert again.predicate({MODALITY: "CT"}, {"peer_ip": "10.1.2.3"})
    assert not again.predicate({MODALITY: "CT"}, {"peer_ip": "192.168.0.1"})


# -- property: compiled predicates equal an independent reference -------------------------------

ATTRS: dict[str, tuple[str, Any, bool]] = {  # name as written -> how the reference reads it
    "Modality": ("tag", MODALITY, False), "0x00080060": ("tag", MODALITY, False),
    "SeriesNumber": ("tag", SERIES, False), "SliceThickness": ("tag", THICK, False),
    "ImageType": ("tag", IMAGE_TYPE, False), "(0009,1001)": ("tag", PRIVATE, False),
    "StationAETitle": ("tag", STATION_AE, True), "calling_ae": ("ctx", "calling_ae", True),
}
VALUE_POOL: list[Any] = [
    "CT", "MR", " CT ", "5", "5.0", "12", "1e3", "", "  ", "HEAD BRAIN", "abc", "C1",
    5, 12, -3, 0, 0.5, 5.0, 2.5,
    ("CT", "MR"), ("5",), (), (12, 0.5), ("abc", 5), b"CT\x00", b"12 ", (b"MR", "CT"), b"",
]
CTX_POOL = ["CT", " CT  ", "MR", "5", "", "  ", "C1", "12"]
LITERAL_POOL: list[Any] = ["CT", "MR", " CT", "5", "5.0", "", "abc", "12", "C1", "ABC",
                           5, 12, 0, -3, 0.5, 5.0, 2.5, 1000]
GLOB_POOL = ["*", "C*", "?T", "*BRAIN*", "[CM]*", "5*", "", "*.5", "[!C]*"]
REGEX_POOL = ["^C", "T$", r"\d", "BRAIN", "^$", r"[0-9]+\.5", "^ ", "e3$"]
LIST_POOL: list[list[Any]] = [["CT"], ["MR", "CT"], [" CT", "abc"], [5], ["5"], [12, "CT"],
                              ["5.0", 0.5], [0, -3, 1000], ["", "C1"]]
VALUES, CTX_VALUES, LITERALS = (st.sampled_from(VALUE_POOL), st.sampled_from(CTX_POOL),
                                st.sampled_from(LITERAL_POOL))
GLOBS, REGEXES = st.sampled_from(GLOB_POOL), st.sampled_from(REGEX_POOL)
OPS = {"==": operator.eq, "!=": operator.eq, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}


def ref_float(x: str) -> float | None:
    try:
        return float(x)      # the pools hold no nan, inf or underscores
    except ValueError:
        return None


def ref_compare(x: Any, op: str, lit: Any, ae: bool) -> bool:
    if ae:
        x = x.strip() if isinstance(x, str) else x
        lit = lit.strip() if isinstance(lit, str) else lit
    if isinstance(x, str) and isinstance(lit, str):
        return bool(OPS[op](x, lit))
    a = ref_float(x) if isinstance(x, str) else x
    b = ref_float(lit) if isinstance(lit, str) else lit
    return a is not None and b is not None and bool(OPS[op](a, b))


def ref_leaf(leaf: tuple[Any, ...], attrs: dict[int, Any], ctx: dict[str, str]) -> bool:
    name, op, operand = leaf
    where, key, ae = ATTRS[name]
    raw = attrs.get(key) if where == "tag" else ctx.get(key)
    def unbytes(x: Any) -> Any:
        return x.decode("latin-1").rstrip("\x00 ") if isinstance(x, bytes) else x

    raw = unbytes(raw)
    values = None if raw is None else [unbytes(x) for x in raw] if isinstance(raw, tuple) else [raw]
    present = raw is not None and raw != () and not (isinstance(raw, str) and not raw.strip())
    if op in ("exists", "missing"):
        return present is (op == "exists")
    negated = op in ("!=", "not in", "not matches", "not ~=")
    if values is None:
        return negated

    def text(x: Any) -> str:
        return (x.strip() if ae else x) if isinstance(x, str) else str(x)

    if op in OPS:
        found = any(ref_compare(x, op, operand, ae) for x in values)
    elif op.endswith("in"):
        found = any(ref_compare(x, "==", lit, ae) for x in values for lit in operand)
    elif op.endswith("matches"):
        found = any(fnmatch.fnmatchcase(text(x), operand) for x in values)
    else:
        found = any(re.search(operand, text(x)) for x in values)
    return not found if negated else found


def render_literal(v: Any, raw_backslashes: bool) -> str:
    if isinstance(v, str):
        body = v.replace('"', '\\"') if raw_backslashes else v.replace("\\", "\\\\").replace(
            '"', '\\"')
        return f'"{body}"'
    return repr(v)


@st.composite
def leaves(draw: st.DrawFn) -> tuple[Any, ...]:
    name = draw(st.sampled_from(sorted(ATTRS)))
    op = draw(st.sampled_from([*OPS, "in", "not in", "matches", "not matches", "~=",
                               "not ~=", "exists", "missing"]))
    if op in OPS:
        return (name, op, draw(LITERALS))
    if op.endswith("in"):
        return (name, op, draw(st.lists(LITERALS, min_size=1, max_size=4)))
    if op.endswith("matches"):
        return (name, op, draw(GLOBS))
    if op.endswith("~="):
        return (name, op, draw(REGEXES))
    return (name, op, None)


def trees() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(leaves(), st.sampled_from([True, False])),
        lambda kids: st.one_of(
            st.tuples(st.just("not"), kids),
            st.tuples(st.sampled_from(["and", "or"]), kids, kids),
        ),
        max_leaves=8,
    )


def ref_eval(node: Any, attrs: dict[int, Any], ctx: dict[str, str]) -> bool:
    if isinstance(node, bool):
        return node
    if node[0] == "not":
        return not ref_eval(node[1], attrs, ctx)
    if node[0] == "and":
        return ref_eval(node[1], attrs, ctx) and ref_eval(node[2], attrs, ctx)
    if node[0] == "or":
        return ref_eval(node[1], attrs, ctx) or ref_eval(node[2], attrs, ctx)
    return ref_leaf(node, attrs, ctx)


PREC = {"or": 1, "and": 2, "not": 3}


def render(node: Any, data: st.DataObject, need: int = 0) -> str:
    """Expression text with only the parentheses precedence needs, plus some at random."""
    def kw(word: str) -> str:
        return data.draw(st.sampled_from([word, word.upper(), word.capitalize()]))

    if isinstance(node, bool):
        text, prec = kw("true" if node else "false"), 4
    elif node[0] == "not":
        text, prec = f"{kw('not')} {render(node[1], data, 3)}", 3
    elif node[0] in ("and", "or"):
        p = PREC[node[0]]
        text, prec = f"{render(node[1], data, p)} {kw(node[0])} {render(node[2], data, p)}", p
    else:
        name, op, operand = node
        raw = data.draw(st.booleans())
        if op in ("exists", "missing"):
            text = f"{name} {kw(op)}"
        elif op.endswith("in"):
            items = ", ".join(render_literal(v, raw) for v in operand)
            text = f"{name} {op.replace('in', kw('in'))} [{items}]"
        else:
            op_text = op.replace("matches", kw("matches"))
            if op.endswith("~=") and data.draw(st.booleans()):
                op_text = op_text.replace("~=", kw("matches_regex"))
            text = f"{name} {op_text} {render_literal(operand, raw and op.endswith('~='))}"
        prec = 4
    if prec < need or data.draw(st.integers(0, 9)) == 0:
        text = f"({text})"
    return text


@settings(max_examples=400, deadline=None)
@given(tree=trees(), data=st.data(),
       attrs=st.fixed_dictionaries({}, optional={
           tag: VALUES for tag in (MODALITY, SERIES, THICK, IMAGE_TYPE, PRIVATE, STATION_AE)}),
       ctx=st.fixed_dictionaries({}, optional={"calling_ae": CTX_VALUES}))
def test_property_matches_reference(tree: Any, data: st.DataObject, attrs: dict[int, Any],
                                    ctx: dict[str, str]) -> None:
    text = render(tree, data)
    compiled = rule(text)
    assert compiled.matches(attrs, ctx) is ref_eval(tree, attrs, ctx), text


def grid_leaves(name: str) -> list[tuple[Any, ...]]:
    return [
        *((name, op, lit) for op in OPS for lit in LITERAL_POOL),
        *((name, op, lits) for op in ("in", "not in") for lits in LIST_POOL),
        *((name, op, g) for op in ("matches", "not matches") for g in GLOB_POOL),
        *((name, op, r) for op in ("~=", "not ~=") for r in REGEX_POOL),
        (name, "exists", None), (name, "missing", None),
    ]


@pytest.mark.parametrize("name", ["Modality", "(0009,1001)", "StationAETitle", "calling_ae"])
def test_reference_grid(name: str) -> None:
    """Every operator x literal x value, against the reference: the semantics table in full."""
    where, key, _ = ATTRS[name]
    pool = VALUE_POOL if where == "tag" else CTX_POOL
    cases = [({key: v}, {}) if where == "tag" else ({}, {key: v}) for v in pool]
    cases.append(({}, {}))                                   # missing
    for leaf in grid_leaves(name):
        name_, op, operand = leaf
        if op.endswith("in"):
            text = f"{name_} {op} [{', '.join(render_literal(v, False) for v in operand)}]"
        elif op in ("exists", "missing"):
            text = f"{name_} {op}"
        else:
            text = f"{name_} {op} {render_literal(operand, False)}"
        predicate = rule(text).matches
        for attrs, ctx in cases:
            assert predicate(attrs, ctx) is ref_leaf(leaf, attrs, ctx), (text, attrs, ctx)


@settings(max_examples=300, deadline=None)
@given(leaf=leaves(), data=st.data(), value=VALUES, ctx_value=CTX_VALUES)
def test_property_single_comparison(leaf: tuple[Any, ...], data: st.DataObject, value: Any,
                                    ctx_value: str) -> None:
    """Dense coverage of the value semantics: one comparison, the attribute always present."""
    where, key, _ = ATTRS[leaf[0]]
    attrs, ctx = ({key: value}, {}) if where == "tag" else ({}, {key: ctx_value})
    text = render(leaf, data)
    assert rule(text).matches(attrs, ctx) is ref_leaf(leaf, attrs, ctx), (text, attrs, ctx)


@settings(max_examples=200, deadline=None)
@given(spec=st.lists(st.tuples(st.booleans(), st.booleans(),
                               st.lists(st.sampled_from("abcd"), max_size=3)), max_size=6),
       default=st.lists(st.sampled_from("xy"), max_size=2, unique=True))
def test_property_route_reference(spec: list[tuple[bool, bool, list[str]]],
                                  default: list[str]) -> None:
    rules = tuple(RuleConfig(f"r{i}", "true" if m else "false", tuple(to), stop)
                  for i, (m, stop, to) in enumerate(spec))
    dests: list[str] = []
    matched: list[str] = []
    for r, (m, stop, to) in zip(rules, spec):
        if m:
            matched.append(r.name)
            for d in to:
                if d not in dests:
                    dests.append(d)
            if stop:
                break
    expected = (RouteDecision(tuple(dests), tuple(matched), False) if matched
                else RouteDecision(tuple(default), (), True))
    rs = RuleSet.from_config(Config(rules=rules, default=tuple(default)))
    assert rs.route({}, {}) == expected
    assert rs.explain({}, {})[-1].decision == expected
