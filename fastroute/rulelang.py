"""The rule expression language: ``match`` values compiled into predicates, never with ``eval``.

It needs nothing from the configuration, so ``fastroute.config`` compiles each rule with it
while loading (errors carry the file and line) and ``fastroute.routing.rules`` builds the
rule set from what the loaded ``Config`` already holds: a rule is compiled once per process.

A rule's ``match`` is one of three forms:

* ``None`` (or ``{}``): always matches.
* a mapping ``{Modality: CT, calling_ae: [CT1, CT2]}``: every key must hold (AND); a list value
  means any of (``in``), a scalar means ``==``. Glob characters ``* ? [`` are NOT special here, a
  value is compared exactly (use the expression form's ``matches`` for patterns). YAML turns
  unquoted ``yes``/``on``/``2024-01-01`` into booleans and dates: those are compile errors, quote
  them. It also reads ``0012`` as the octal number 10, which cannot be detected here: quote
  values with leading zeros. Keys written ``0x00091001`` arrive from YAML as integers and are
  taken as tags; write ``(0009,1001)`` keys in block style or quoted (a flow mapping splits at
  the comma).
* an expression string, parsed here by a tokenizer and a recursive-descent parser::

      Modality == "MR" and StudyDescription matches "*BRAIN*"
      not (calling_ae in ["CT1", "CT2"]) or peer_ip in "10.0.0.0/8"
      AccessionNumber missing and (0009,1001) ~= "^RESEARCH"

  Precedence, loosest first: ``or``, ``and``, ``not``, comparison; parentheses group.
  Comparisons: ``== != < <= > >=``, ``in [..]`` / ``not in [..]``, ``matches "glob"``
  (``fnmatch.fnmatchcase``), ``matches_regex "re"`` / ``~= "re"`` (``re.search``; ``not`` may
  precede ``matches`` and ``matches_regex``), and the postfix ``exists`` / ``missing``;
  ``true`` and ``false`` are constant predicates. Literals: ``"double"`` or ``'single'`` quoted
  strings (escapes ``\\\\ \\" \\' \\n \\t \\r``; any other backslash is kept as written, so
  regexes such as ``"\\d+"`` need no doubling), integers, floats and lists ``[a, b]``.
  Keywords are case-insensitive.

Identifiers are DICOM keywords from pydicom's dictionary, tags written ``(0009,1001)`` or
``0x00091001`` (so private tags can be routed on; the tag number alone is used, the private
creator is not checked), or the association context ``calling_ae``, ``called_ae``, ``peer_ip``.
An unknown identifier is a compile error with a suggestion: a typo must not silently never match.

Semantics at routing time (``attrs`` maps tag -> value; a tuple is a multi-valued attribute):

* A multi-valued attribute matches if ANY of its values does (``==``, ``in``, ``matches``,
  ``<`` ...). The negated operators are exact negations: ``!=`` means none equal, ``not in``
  means none in the list.
* A missing attribute makes ``==``, ``in``, ``matches``, ``<`` ... false, and so ``!=``,
  ``not in`` and ``missing`` true. ``missing`` also holds for an empty value (``""``, ``()``,
  ``b""``): a DICOM type 2 attribute that is present but empty carries no information.
* Comparison is numeric when either side is a number; the other side is converted with
  ``float`` and a value that is not numeric does not match. Otherwise strings compare exactly
  and case-sensitively (``<`` is lexical, which suits DA/TM values such as ``"20240101"``),
  except AE titles (``calling_ae``, ``called_ae`` and attributes of VR AE), which compare with
  surrounding spaces stripped. ``matches`` and ``~=`` see numbers as ``str(value)``.
  ``bytes`` values (unknown VR) are compared as latin-1 text with trailing NULs and spaces removed.
* ``peer_ip`` compares as an address: ``peer_ip == "10.0.0.1"``, ``peer_ip in "10.0.0.0/8"``
  (a string after ``in`` is a network), ``peer_ip in ["10.0.0.0/8", "192.168.1.7"]``; in the
  mapping form every ``peer_ip`` value is a network or address. IPv4-mapped IPv6 peers match
  IPv4 networks.

Rules are compiled to nested closures once, so ``RuleSet.route`` costs a few dictionary lookups
and function calls per rule; the set of tags the rules need (``RuleSet.tags``) tells the peek
which attributes to read from the encoded bytes.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import ipaddress
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, Union

from pydicom import datadict

Scalar = Union[str, int, float]      # a literal in a rule
# A value as fastroute.dicom.attrs reads it; a tuple is a multi-valued attribute.
Value = Union[str, int, float, bytes, tuple[Union[str, int, float, bytes], ...]]
Attrs = Mapping[int, Value]
Context = Mapping[str, str]
Predicate = Callable[[Attrs, Context], bool]
_Test = Callable[[Any], bool]

CONTEXT_NAMES = ("calling_ae", "called_ae", "peer_ip")
_KEYWORDS = frozenset({"and", "or", "not", "in", "matches", "matches_regex", "exists", "missing",
                       "true", "false"})
_OPERATORS = "==, !=, <, <=, >, >=, in, not in, matches, matches_regex, ~=, exists, missing"
_IDENT_HINT = ("identifiers are DICOM keywords (Modality), tags ((0009,1001) or 0x00091001), "
               "or calling_ae, called_ae, peer_ip")
_MAX_DEPTH = 64


class _Fail(Exception):
    """Internal: a compile error, with the offset into the expression when there is one."""

    def __init__(self, message: str, pos: int | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


# -- identifiers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Ident:
    name: str
    tag: int | None          # a DICOM attribute, or
    ctx: str | None          # an association context key
    ae: bool                 # compare with surrounding spaces stripped


_TAG_PAREN_RE = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_TAG_HEX_RE = re.compile(r"0[xX]([0-9A-Fa-f]{8})")


def _tag_ident(name: str, tag: int) -> _Ident:
    ae = datadict.dictionary_has_tag(tag) and datadict.dictionary_VR(tag) == "AE"
    return _Ident(name, tag, None, ae)


def _resolve(name: Any, pos: int | None = None) -> _Ident:
    """Resolve a keyword, a tag spelling, an integer tag or a context name."""
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name <= 0xFFFFFFFF:
            raise _Fail(f"tag {name:#x} is out of range", pos)
        return _tag_ident(f"({name >> 16:04X},{name & 0xFFFF:04X})", name)
    if not isinstance(name, str):
        raise _Fail(f"expected an attribute name, got {name!r}", pos, _IDENT_HINT)
    if name in CONTEXT_NAMES:
        return _Ident(name, None, name, name != "peer_ip")
    m = _TAG_PAREN_RE.fullmatch(name.strip()) or _TAG_HEX_RE.fullmatch(name.strip())
    if m:
        return _resolve(int("".join(m.groups()), 16), pos)
    tag = datadict.tag_for_keyword(name) if name else None
    if tag is None:
        raise _Fail(f"unknown attribute {name!r}", pos, _did_you_mean(name))
    return _tag_ident(name, tag)


@functools.lru_cache(maxsize=1)
def _candidates() -> tuple[str, ...]:
    return (*CONTEXT_NAMES, *(k for k in datadict.keyword_dict if k))


def did_you_mean(name: str, candidates: Sequence[str], cutoff: float = 0.7) -> str:
    """``did you mean 'X' or 'Y'?`` for the closest candidates (a case-only slip first), or ""."""
    folded = [c for c in candidates if c.lower() == name.lower()]
    close = folded or difflib.get_close_matches(name, candidates, n=3, cutoff=cutoff)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    return "did you mean " + (" or ".join(quoted) if len(quoted) < 3 else
                              ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"


def _did_you_mean(name: str) -> str:
    return did_you_mean(name, _candidates()) or _IDENT_HINT


# -- value tests --------------------------------------------------------------------------------
# A test takes one scalar value (a str, int or float) and answers one comparison; _lift turns it
# into a predicate over (attrs, context) that handles missing, multi-valued and bytes values.

_NUM_RE = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


def _num(s: str) -> float | None:
    """The number a DICOM string holds (IS/DS style), or None; no nan/inf/underscores."""
    return float(s) if _NUM_RE.fullmatch(s) else None


def _text(v: bytes) -> str:
    return v.decode("latin-1").rstrip("\x00 ")


def _present(v: Any) -> bool:
    if isinstance(v, str):
        return bool(v.strip())
    if isinstance(v, bytes):
        return bool(_text(v).strip())
    return v is not None and (bool(v) or isinstance(v, (int, float)))


def _lift(ident: _Ident, test: _Test, eq: str | None = None,
          within: frozenset[str] | None = None) -> Predicate:
    """Apply ``test`` to an identifier's value: false if missing, any-of if multi-valued.

    ``eq`` / ``within`` inline the commonest case, a str value ``== eq`` or ``in within``, which
    is the same answer ``test`` would give but saves a call per rule on the hot path.
    """
    if ident.ae:
        inner = test

        def stripped(x: Any) -> bool:
            return inner(x.strip() if isinstance(x, str) else x)
        test = stripped

    if ident.ctx is not None:
        key = ident.ctx
        if eq is not None or within is not None:
            target: Any = within if eq is None else frozenset((eq,))
            if ident.ae:
                def ctx_in_ae(attrs: Attrs, context: Context) -> bool:
                    v = context.get(key)
                    return v is not None and v.strip() in target
                return ctx_in_ae

            def ctx_in(attrs: Attrs, context: Context) -> bool:
                return context.get(key) in target
            return ctx_in

        def ctx_pred(attrs: Attrs, context: Context) -> bool:
            v = context.get(key)
            return v is not None and test(v)
        return ctx_pred

    tag = ident.tag
    assert tag is not None

    def other(v: Any) -> bool:
        if v is None:
            return False
        if isinstance(v, tuple):
            for x in v:
                if test(_text(x) if isinstance(x, bytes) else x):
                    return True
            return False
        return test(_text(v) if isinstance(v, bytes) else v)

    if not ident.ae and eq is not None:
        def attr_eq(attrs: Attrs, context: Context) -> bool:
            v = attrs.get(tag)
            return v == eq if v.__class__ is str else other(v)
        return attr_eq
    if not ident.ae and within is not None:
        members = within

        def attr_in(attrs: Attrs, context: Context) -> bool:
            v = attrs.get(tag)
            return v in members if v.__class__ is str else other(v)
        return attr_in

    def attr_pred(attrs: Attrs, context: Context) -> bool:
        v = attrs.get(tag)
        return test(v) if v.__class__ is str else other(v)
    return attr_pred


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _eq_test(lit: Scalar) -> _Test:
    if isinstance(lit, str):
        lit_num = _num(lit)
        if lit_num is None:
            return lambda x: x == lit          # a number never equals a non-numeric string

        def eq_str(x: Any) -> bool:
            return x == lit if isinstance(x, str) else x == lit_num
        return eq_str

    def eq_num(x: Any) -> bool:
        if isinstance(x, str):
            n = _num(x)
            return n is not None and n == lit
        return bool(x == lit)
    return eq_num


def _order_test(op: str, lit: Scalar) -> _Test:
    cmp = _ORDER[op]
    if isinstance(lit, str):
        lit_num = _num(lit)

        def order_str(x: Any) -> bool:
            if isinstance(x, str):
                return cmp(x, lit)
            return lit_num is not None and cmp(x, lit_num)
        return order_str

    def order_num(x: Any) -> bool:
        if isinstance(x, str):
            n = _num(x)
            return n is not None and cmp(n, lit)
        return cmp(x, lit)
    return order_num


def _in_test(lits: Sequence[Scalar]) -> _Test:
    strs = frozenset(v for v in lits if isinstance(v, str))
    # String attributes meet numeric literals as numbers; numeric attributes meet every literal
    # that is a number or a numeric string.
    for_strs = frozenset(float(v) for v in lits if not isinstance(v, str))
    for_nums = for_strs | frozenset(n for n in map(_num, strs) if n is not None)
    if not for_strs:
        def in_strs(x: Any) -> bool:
            return x in strs if isinstance(x, str) else x in for_nums
        return in_strs

    def in_mixed(x: Any) -> bool:
        if isinstance(x, str):
            if x in strs:
                return True
            n = _num(x)
            return n is not None and n in for_strs
        return x in for_nums
    return in_mixed


def _glob_test(pattern: str) -> _Test:
    rx = re.compile(fnmatch.translate(pattern)).match
    return lambda x: rx(x if isinstance(x, str) else str(x)) is not None


def _regex_test(rx: re.Pattern[str]) -> _Test:
    search = rx.search
    return lambda x: search(x if isinstance(x, str) else str(x)) is not None


@functools.lru_cache(maxsize=4096)
def _ip(s: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        a = ipaddress.ip_address(s.split("%", 1)[0].strip())
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _networks(lits: Sequence[Scalar], pos: int | None) -> tuple[Any, ...]:
    nets = []
    for v in lits:
        try:
            if not isinstance(v, str):
                raise ValueError
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise _Fail(f"peer_ip needs IP networks or addresses, got {v!r}", pos,
                        "write networks as \"10.0.0.0/8\" and addresses as \"10.0.0.1\"") from None
    return tuple(nets)


def _peer_in(nets: tuple[Any, ...]) -> _Test:
    # ipaddress membership is slow pure Python; peers are few, so remember answers per peer.
    seen: dict[str, bool] = {}

    def test(x: Any) -> bool:
        hit = seen.get(x)
        if hit is None:
            a = _ip(x)
            hit = a is not None and any(a in n for n in nets)
            if len(seen) >= 4096:
                seen.clear()
            seen[x] = hit
        return hit
    return test


def _peer_eq(lit: Scalar, pos: int | None) -> _Test:
    if isinstance(lit, str) and "/" in lit:
        raise _Fail(f"peer_ip == {lit!r} compares with a network", pos,
                    f"use: peer_ip in {_render(lit)}")
    want = _ip(lit) if isinstance(lit, str) else None
    if want is None:
        raise _Fail(f"peer_ip needs an IP address, got {lit!r}", pos)
    return lambda x: _ip(x) == want


def _not(p: Predicate) -> Predicate:
    if p is _TRUE:
        return _FALSE
    if p is _FALSE:
        return _TRUE
    return lambda a, c: not p(a, c)


def _TRUE(attrs: Attrs, context: Context) -> bool:
    return True


def _FALSE(attrs: Attrs, context: Context) -> bool:
    return False


def _all(preds: Iterable[Predicate]) -> Predicate:
    ps = [p for p in preds if p is not _TRUE]
    if any(p is _FALSE for p in ps):
        return _FALSE
    if not ps:
        return _TRUE
    if len(ps) == 1:
        return ps[0]
    if len(ps) == 2:
        a, b = ps
        return lambda at, cx: a(at, cx) and b(at, cx)
    tup = tuple(ps)

    def all_(at: Attrs, cx: Context) -> bool:
        for p in tup:
            if not p(at, cx):
                return False
        return True
    return all_


def _any(preds: Iterable[Predicate]) -> Predicate:
    ps = [p for p in preds if p is not _FALSE]
    if any(p is _TRUE for p in ps):
        return _TRUE
    if not ps:
        return _FALSE
    if len(ps) == 1:
        return ps[0]
    if len(ps) == 2:
        a, b = ps
        return lambda at, cx: a(at, cx) or b(at, cx)
    tup = tuple(ps)

    def any_(at: Attrs, cx: Context) -> bool:
        for p in tup:
            if p(at, cx):
                return True
        return False
    return any_


def _presence(ident: _Ident, want: bool) -> Predicate:
    if ident.ctx is not None:
        key = ident.ctx

        def ctx_present(attrs: Attrs, context: Context) -> bool:
            return _present(context.get(key)) is want
        return ctx_present
    tag = ident.tag
    assert tag is not None

    def attr_present(attrs: Attrs, context: Context) -> bool:
        return _present(attrs.get(tag)) is want
    return attr_present


def _compare(ident: _Ident, op: str, lit: Scalar, pos: int | None) -> Predicate:
    """``ident op lit`` for the six comparison operators."""
    if op == "!=":
        return _not(_compare(ident, "==", lit, pos))
    if ident.ctx == "peer_ip":
        if op != "==":
            raise _Fail(f"peer_ip cannot be compared with {op!r}", pos,
                        "use ==, !=, in, not in, matches or ~=")
        return _lift(ident, _peer_eq(lit, pos))
    if ident.ae and isinstance(lit, str):
        lit = lit.strip()
    if op == "==":
        return _lift(ident, _eq_test(lit), eq=lit if isinstance(lit, str) else None)
    return _lift(ident, _order_test(op, lit))


def _member(ident: _Ident, lits: Sequence[Scalar], pos: int | None) -> Predicate:
    """``ident in [lits]``."""
    if not lits:
        raise _Fail("an empty list never matches", pos)
    if ident.ctx == "peer_ip":
        return _lift(ident, _peer_in(_networks(lits, pos)))
    if ident.ae:
        lits = [v.strip() if isinstance(v, str) else v for v in lits]
    texts = frozenset(v for v in lits if isinstance(v, str))
    only_text = all(isinstance(v, str) for v in lits)
    return _lift(ident, _in_test(lits), within=texts if only_text else None)


def _render(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_render(x) for x in v) + "]"
    return repr(v)


# -- tokenizer ----------------------------------------------------------------------------------

class _Tok(NamedTuple):
    kind: str      # 'ident', 'tag', 'str', 'num', 'eof', a lower-case keyword, or the symbol
    value: Any
    pos: int
    text: str


_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE = re.compile(r"-?(?:\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_SYMBOLS = ("==", "!=", "<=", ">=", "~=", "<", ">", "(", ")", "[", "]", ",")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_BAD_SYMBOLS = {"=": "use '==' to compare", "&": "use 'and'", "|": "use 'or'", "!": "use 'not'",
                "*": "quote patterns: matches \"*BRAIN*\"", "?": "quote patterns: matches \"CT?\""}


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self._peeked: _Tok | None = None

    def peek(self) -> _Tok:
        if self._peeked is None:
            self._peeked = self._scan()
        return self._peeked

    def next(self) -> _Tok:
        tok = self.peek()
        self._peeked = None
        return tok

    def _scan(self) -> _Tok:
        s, i, n = self.text, self.pos, len(self.text)
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            self.pos = n
            return _Tok("eof", None, n, "")
        c = s[i]
        m: re.Match[str] | None
        if c == "(" and (m := _TAG_PAREN_RE.match(s, i)):
            return self._tok("tag", int(m.group(1) + m.group(2), 16), i, m.end())
        if c == "0" and s[i + 1:i + 2] in ("x", "X"):
            m = _TAG_HEX_RE.match(s, i)
            if not m or (m.end() < n and (s[m.end()].isalnum() or s[m.end()] == "_")):
                raise _Fail("a tag written 0x... needs exactly 8 hex digits, e.g. 0x00091001", i)
            return self._tok("tag", int(m.group(1), 16), i, m.end())
        if c in "0123456789-." and (m := _NUMBER_RE.match(s, i)):
            end = m.end()
            if end < n and (s[end].isalnum() or s[end] in "_."):
                raise _Fail(f"malformed number starting {s[i:end + 1]!r}", i,
                            "quote text values such as UIDs: \"1.2.840.10008\"")
            txt = m.group(0)
            value: Scalar = float(txt) if (m.group(1) or m.group(2) or "." in txt) else int(txt)
            return self._tok("num", value, i, end)
        if c in "\"'":
            return self._string(i)
        if m := _WORD_RE.match(s, i):
            word = m.group(0)
            kind = word.lower() if word.lower() in _KEYWORDS else "ident"
            return self._tok(kind, word, i, m.end())
        for sym in _SYMBOLS:
            if s.startswith(sym, i):
                return self._tok(sym, sym, i, i + len(sym))
        hint = _BAD_SYMBOLS.get(c, "")
        raise _Fail(f"unexpected character {c!r}", i, hint)

    def _tok(self, kind: str, value: Any, start: int, end: int) -> _Tok:
        self.pos = end
        return _Tok(kind, value, start, self.text[start:end])

    def _string(self, start: int) -> _Tok:
        s, quote, i = self.text, self.text[start], start + 1
        out: list[str] = []
        while i < len(s):
            c = s[i]
            if c == quote:
                return self._tok("str", "".join(out), start, i + 1)
            if c == "\\" and i + 1 < len(s):
                nxt = s[i + 1]
                out.append(_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            out.append(c)
            i += 1
        raise _Fail("unterminated string", start, f"close it with {quote}")


# -- parser -------------------------------------------------------------------------------------

def _describe(tok: _Tok) -> str:
    return "the end of the expression" if tok.kind == "eof" else repr(tok.text)


class _Parser:
    """Recursive descent: or_ > and_ > not_ > primary (comparison or parenthesised)."""

    def __init__(self, text: str) -> None:
        self.lex = _Lexer(text)
        self.tags: set[int] = set()
        self.depth = 0

    def parse(self) -> Predicate:
        if self.lex.peek().kind == "eof":
            raise _Fail("empty expression", 0, "omit match to match everything, or write true")
        pred = self.or_()
        tok = self.lex.peek()
        if tok.kind == ")":
            raise _Fail("unmatched ')'", tok.pos)
        if tok.kind != "eof":
            raise _Fail(f"expected 'and', 'or' or the end of the expression, got {_describe(tok)}",
                        tok.pos)
        return pred

    def or_(self) -> Predicate:
        preds = [self.and_()]
        while self.lex.peek().kind == "or":
            self.lex.next()
            preds.append(self.and_())
        return _any(preds)

    def and_(self) -> Predicate:
        preds = [self.not_()]
        while self.lex.peek().kind == "and":
            self.lex.next()
            preds.append(self.not_())
        return _all(preds)

    def not_(self) -> Predicate:
        negations = 0
        while self.lex.peek().kind == "not":
            self.lex.next()
            negations += 1
        pred = self.primary()
        return _not(pred) if negations % 2 else pred

    def primary(self) -> Predicate:
        tok = self.lex.next()
        if tok.kind == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise _Fail("expression nested too deeply", tok.pos)
            pred = self.or_()
            close = self.lex.next()
            if close.kind != ")":
                raise _Fail(f"expected ')' to close the '(' at column {tok.pos + 1}, "
                            f"got {_describe(close)}", close.pos)
            self.depth -= 1
            return pred
        if tok.kind == "true":
            return _TRUE
        if tok.kind == "false":
            return _FALSE
        if tok.kind in ("ident", "tag"):
            return self.comparison(tok)
        raise _Fail(f"expected an attribute, 'not' or '(', got {_describe(tok)}", tok.pos,
                    _IDENT_HINT if tok.kind in ("str", "num") else "")

    def comparison(self, name: _Tok) -> Predicate:
        ident = _resolve(name.value, name.pos)
        if ident.tag is not None:
            self.tags.add(ident.tag)
        op = self.lex.next()
        negate = False
        if op.kind == "not":
            op = self.lex.next()
            if op.kind not in ("in", "matches", "matches_regex", "~="):
                raise _Fail(f"expected 'in', 'matches' or 'matches_regex' after 'not', "
                            f"got {_describe(op)}", op.pos)
            negate = True
        pred: Predicate
        if op.kind in ("==", "!=", "<", "<=", ">", ">="):
            lit = self.value(op)
            pred = _compare(ident, op.kind, lit.value, lit.pos)
        elif op.kind == "in":
            pred = self.membership(ident, op)
        elif op.kind == "matches":
            pat = self.string(op)
            pred = _lift(ident, _glob_test(pat.value))
        elif op.kind in ("matches_regex", "~="):
            pat = self.string(op)
            try:
                rx = re.compile(pat.value)
            except re.error as exc:
                raise _Fail(f"bad regular expression {pat.value!r}: {exc.msg}",
                            pat.pos + 1 + (exc.pos or 0)) from None
            pred = _lift(ident, _regex_test(rx))
        elif op.kind in ("exists", "missing"):
            pred = _presence(ident, op.kind == "exists")
        else:
            raise _Fail(f"expected an operator after {name.text!r}, got {_describe(op)}", op.pos,
                        f"operators: {_OPERATORS}")
        return _not(pred) if negate else pred

    def value(self, after: _Tok) -> _Tok:
        tok = self.lex.next()
        if tok.kind not in ("str", "num"):
            hint = "quote text values" if tok.kind in ("ident", "true", "false") else ""
            raise _Fail(f"expected a value after {after.text!r}, got {_describe(tok)}", tok.pos,
                        hint)
        return tok

    def string(self, after: _Tok) -> _Tok:
        tok = self.lex.next()
        if tok.kind != "str":
            raise _Fail(f"expected a quoted pattern after {after.text!r}, got {_describe(tok)}",
                        tok.pos)
        return tok

    def membership(self, ident: _Ident, op: _Tok) -> Predicate:
        tok = self.lex.peek()
        if tok.kind == "str" and ident.ctx == "peer_ip":
            self.lex.next()
            return _member(ident, [tok.value], tok.pos)
        if tok.kind != "[":
            raise _Fail(f"expected a list [...] after 'in', got {_describe(tok)}", tok.pos,
                        "write: Modality in [\"CT\", \"MR\"]")
        start = after = self.lex.next()
        lits: list[Scalar] = []
        while self.lex.peek().kind != "]":        # a trailing comma is allowed
            lits.append(self.value(after).value)
            sep = self.lex.peek()
            if sep.kind == ",":
                after = self.lex.next()
            elif sep.kind != "]":
                raise _Fail(f"expected ',' or ']' in the list, got {_describe(sep)}", sep.pos)
        self.lex.next()
        return _member(ident, lits, start.pos)


def _mapping_rule(match: Mapping[Any, Any]) -> tuple[Predicate, set[int], str]:
    preds, tags, parts = [], set(), []
    for key, value in match.items():
        ident = _resolve(key)
        if ident.tag is not None:
            tags.add(ident.tag)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                raise _Fail(f"no value for {ident.name!r}", None,
                            f"to route on absence write an expression: {ident.name} missing")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                what = "a boolean" if isinstance(v, bool) else f"a {type(v).__name__}"
                raise _Fail(f"value for {ident.name!r} must be text or a number, got {what} "
                            f"({v!r})", None,
                            "YAML reads unquoted yes/no/on/off/true/false and dates specially: "
                            "quote the value")
        if isinstance(value, list):
            preds.append(_member(ident, values, None))
            parts.append(f"{ident.name} in {_render(values)}")
        elif ident.ctx == "peer_ip":
            preds.append(_member(ident, values, None))
            parts.append(f"{ident.name} in {_render(value)}")
        else:
            preds.append(_compare(ident, "==", value, None))
            parts.append(f"{ident.name} == {_render(value)}")
    return _all(preds), tags, " and ".join(parts) or "true"




# -- compiled matches ---------------------------------------------------------------------------

class ExpressionError(ValueError):
    """A ``match`` that does not compile; ``message`` quotes the expression and the column.

    It carries no file or line: the caller that knows where the rule came from adds them.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled ``match``: a closure tree, the tags it reads, and its text as an expression.

    It pickles as its ``match`` and compiles again when unpickled: closures cannot cross a
    process boundary, so a spawned process compiles each rule once, as it receives the Config.
    """

    match: Mapping[Any, Any] | str | None
    predicate: Predicate = field(repr=False, compare=False)
    tags: frozenset[int] = frozenset()
    source: str = "true"

    def __reduce__(self) -> tuple[Callable[[Any], Matcher], tuple[Any]]:
        return compile_match, (self.match,)


def compile_match(match: Mapping[Any, Any] | str | None) -> Matcher:
    """Compile a rule's ``match`` (None, a mapping or an expression); raise ExpressionError."""
    pred: Predicate
    try:
        if match is None:
            pred, tags, source = _TRUE, set(), "true"
        elif isinstance(match, str):
            parser = _Parser(match)
            pred, tags, source = parser.parse(), parser.tags, match
        elif isinstance(match, Mapping):
            pred, tags, source = _mapping_rule(match)
        else:
            raise _Fail(f"match must be a mapping, an expression string or empty, got {match!r}")
    except _Fail as exc:
        message = exc.message
        if isinstance(match, str) and exc.pos is not None:
            # One line, same offsets: the column counts in the quoted text.
            flat = re.sub(r"\s", " ", match).rstrip()
            end = " (end of expression)" if exc.pos >= len(flat) else ""
            message += f" at column {exc.pos + 1}{end}: {flat}"
        raise ExpressionError(message, exc.hint) from None
    return Matcher(match, pred, frozenset(tags), source)


__all__ = [
    "Attrs", "CONTEXT_NAMES", "Context", "ExpressionError", "Matcher", "Predicate", "Value",
    "compile_match", "did_you_mean",
]
