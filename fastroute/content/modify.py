"""``modify:`` actions (issue 15): explicit, per destination or per rule, top-level attributes only.

A ``modify:`` list is applied in order; each entry is a mapping with exactly one action key,
an optional ``when:`` (a rules-language expression, evaluated against the dataset as the
earlier entries left it; ``missing`` holds for an absent or empty element) and an optional
``record_original: true``: the entry appends one Original Attributes Sequence (0400,0561) item
(PS3.3 C.12.1.1.9: Modified Attributes Sequence with the previous values of the attributes it
replaced or removed -- an attribute it inserted had none --, Attribute Modification DateTime,
Modifying System "fastroute", Reason "COERCE").

* ``set: {InstitutionName: "General Hospital", "(0009,1001)": {value: X, vr: LO}}`` -- a
  private or unknown tag needs its VR; a list value is multi-valued;
* ``delete: [PatientComments, "(0009,1001)", private, "private:SIEMENS CSA HEADER"]`` (or one
  string): keywords, tags, every private element, or one private creator's block;
* ``copy: {StudyID: AccessionNumber}`` -- target: source (an absent source copies nothing);
* ``regex: {AccessionNumber: ['^GH-(.*)$', '\\1']}`` -- Python ``re.sub`` on each value;
* ``lookup: {PatientID: mapping.csv}`` with ``on_missing: keep|fail`` (default keep): a value
  not in the table is kept, or (fail) the object fails for that destination -- never sent
  unmapped. The CSV has two columns, old,new. Its first row is skipped as a header when it
  reads ``old,new`` (any case); rows starting with ``#`` and blank rows are skipped; any
  other row must have exactly two cells; an old value listed twice with different new values
  is an error. Relative paths are relative to the configuration file's folder. Tables are
  read when the Modifier is built and again on ``reload()`` (SIGHUP).

Keys are DICOM keywords or ``(gggg,eeee)`` tags; an unknown keyword is an error with a
did-you-mean. Only the named elements change: nothing is decoded or re-encoded here
(``fastroute.content.plan`` parses and writes the bytes once).
"""
from __future__ import annotations

import csv
import datetime
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydicom import charset, datadict
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName

from fastroute.content.changes import Change
from fastroute.rulelang import ExpressionError, Matcher, compile_match, did_you_mean

log = logging.getLogger("fastroute.content")

OPS = ("set", "delete", "copy", "regex", "lookup")
_OPTIONS = ("when", "record_original", "on_missing")
_TAG_RE = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_ORIGINAL_ATTRIBUTES = 0x04000561

# PS3.5 Table 6.2-1: maximum value lengths (characters/bytes) of the text VRs
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
            "LT": 10240, "PN": 64 * 3 + 2, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
_TEXT_VRS = frozenset({*_MAX_LEN, "UC", "UR", "UT"})
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "AT"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_SETTABLE = _TEXT_VRS | _INT_VRS | _FLOAT_VRS


class ModifyError(ValueError):
    """An object a ``modify`` action cannot change correctly (a lookup ``on_missing: fail``, a
    copied value too long for its target): the object fails for that destination."""


@dataclass(frozen=True, slots=True)
class ModifyAction:
    """One entry of a ``modify:`` list, parsed and checked at load time.

    ``spec`` by ``op`` (tags as integers, so it pickles to the sender processes and compares
    for reloads): set ``((tag, vr, value), ...)`` (value a str/int/float or a tuple of them);
    delete ``(("tag", tag) | ("private", "") | ("creator", NAME), ...)``; copy
    ``((target, source), ...)``; regex ``((tag, pattern, replacement), ...)``; lookup
    ``((tag, path), ...)``.
    """

    op: str                                   # set | delete | copy | regex | lookup
    spec: Any                                 # the op's parsed arguments (see above)
    when: str | None = None                   # rules expression; None: always
    record_original: bool = False             # old values into Original Attributes Sequence
    on_missing: str = "keep"                  # lookup: keep | fail

    def tags(self) -> frozenset[int]:
        """The public tags this action may change (``delete private`` names none)."""
        if self.op == "delete":
            return frozenset(arg for kind, arg in self.spec if kind == "tag")
        return frozenset(entry[0] for entry in self.spec)


# -- parsing ------------------------------------------------------------------------------------

def _tag_name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _keyword(tag: int) -> str:
    return datadict.keyword_for_tag(tag) if datadict.dictionary_has_tag(tag) else ""


def parse_tag(name: Any) -> int:
    """A keyword, ``(gggg,eeee)`` or an integer tag; ValueError with a did-you-mean."""
    if isinstance(name, int) and not isinstance(name, bool):
        if 0 <= name <= 0xFFFFFFFF:
            return name
        raise ValueError(f"tag {name:#x} is out of range")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"expected a DICOM keyword or a (gggg,eeee) tag, got {name!r}")
    m = _TAG_RE.fullmatch(name.strip())
    if m:
        return int(m.group(1) + m.group(2), 16)
    tag = datadict.tag_for_keyword(name.strip())
    if tag is None:
        hint = did_you_mean(name.strip(), [k for k in datadict.keyword_dict if k])
        raise ValueError(f"unknown attribute {name!r}" + (f"; {hint}" if hint else ""))
    return int(tag)


def _dictionary_vr(tag: int, what: str) -> str:
    if tag >> 16 & 1:
        raise ValueError(f"{what}: a private tag needs its VR: write {{value: ..., vr: LO}}")
    if not datadict.dictionary_has_tag(tag):
        raise ValueError(f"{what}: not in the DICOM dictionary; write {{value: ..., vr: XX}}")
    vr = str(datadict.dictionary_VR(tag))
    if " or " in vr:
        raise ValueError(f"{what}: its VR is one of {vr}; write {{value: ..., vr: ...}}")
    return vr


def _check_scalar(v: Any, vr: str, what: str) -> str | int | float:
    if isinstance(v, bool) or v is None or isinstance(v, (dict, list, tuple)):
        raise ValueError(f"{what}: {v!r} is not a value for VR {vr} (quote text, e.g. \"YES\")")
    if vr in _INT_VRS:
        if not isinstance(v, int):
            raise ValueError(f"{what}: VR {vr} needs an integer, got {v!r}")
        return v
    if vr in _FLOAT_VRS:
        if not isinstance(v, (int, float)):
            raise ValueError(f"{what}: VR {vr} needs a number, got {v!r}")
        return float(v)
    if not isinstance(v, (str, int, float)):
        raise ValueError(f"{what}: VR {vr} needs text, got {v!r}")
    text = str(v)
    if "\\" in text and vr not in _SINGLE_VALUED:
        raise ValueError(f"{what}: a backslash separates values; write a list instead")
    limit = _MAX_LEN.get(vr)
    if limit is not None and len(text) > limit:
        raise ValueError(f"{what}: {text!r} is {len(text)} characters, VR {vr} allows {limit}")
    return text


def _check_value(value: Any, vr: str, what: str) -> Any:
    if vr not in _SETTABLE:
        raise ValueError(f"{what}: VR {vr} cannot be set from the configuration")
    if isinstance(value, list):
        if vr in _SINGLE_VALUED and len(value) != 1:
            raise ValueError(f"{what}: VR {vr} holds one value, got {len(value)}")
        return tuple(_check_scalar(v, vr, what) for v in value)
    return _check_scalar(value, vr, what)


def _mapping(value: Any, op: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{op}: expected a mapping of attribute: value, got {value!r}")
    return value


def _parse_set(value: Any) -> tuple[tuple[int, str, Any], ...]:
    out = []
    for name, v in _mapping(value, "set").items():
        tag = parse_tag(name)
        what = f"set {name}"
        if isinstance(v, Mapping):
            extra = set(v) - {"value", "vr"}
            if extra or "value" not in v:
                raise ValueError(f"{what}: expected {{value: ..., vr: XX}}, got {dict(v)!r}")
            vr = str(v["vr"]).upper() if v.get("vr") is not None else _dictionary_vr(tag, what)
            if vr not in _SETTABLE:
                raise ValueError(f"{what}: unknown or unsettable VR {vr!r}")
            v = v["value"]
        else:
            vr = _dictionary_vr(tag, what)
        if v is None:
            v = ""      # an empty value (type 2)
        out.append((tag, vr, "" if v == "" else _check_value(v, vr, what)))
    return tuple(out)


def _parse_delete(value: Any) -> tuple[tuple[str, Any], ...]:
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"delete: expected a list of attributes, 'private' or 'private:CREATOR', "
                         f"got {value!r}")
    out: list[tuple[str, Any]] = []
    for item in items:
        if item == "private":
            out.append(("private", ""))
        elif isinstance(item, str) and item.startswith("private:"):
            creator = item[len("private:"):].strip()
            if not creator:
                raise ValueError("delete: 'private:' needs a private creator, e.g. 'private:SIEMENS CSA HEADER'")
            out.append(("creator", creator))
        else:
            out.append(("tag", parse_tag(item)))
    return tuple(out)


def _parse_copy(value: Any) -> tuple[tuple[int, int], ...]:
    out = []
    for target, source in _mapping(value, "copy").items():
        t, s = parse_tag(target), parse_tag(source)
        if t >> 16 & 1:
            _dictionary_vr(t, f"copy to {target}")    # raises: a private target has no VR
        out.append((t, s))
    return tuple(out)


def _parse_regex(value: Any) -> tuple[tuple[int, str, str], ...]:
    out = []
    for name, v in _mapping(value, "regex").items():
        tag = parse_tag(name)
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise ValueError(f"regex {name}: expected [pattern, replacement], got {v!r}")
        try:
            re.compile(v[0]).sub(v[1], "")
        except re.error as exc:
            raise ValueError(f"regex {name}: {exc}") from None
        if not tag >> 16 & 1 and datadict.dictionary_has_tag(tag) and \
                datadict.dictionary_VR(tag) not in _TEXT_VRS:
            raise ValueError(f"regex {name}: VR {datadict.dictionary_VR(tag)} is not text")
        out.append((tag, v[0], v[1]))
    return tuple(out)


def _parse_lookup(value: Any, base_dir: Path | None) -> tuple[tuple[int, str], ...]:
    out = []
    for name, path in _mapping(value, "lookup").items():
        tag = parse_tag(name)
        if not isinstance(path, str) or not path:
            raise ValueError(f"lookup {name}: expected a CSV file name, got {path!r}")
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        read_table(p)        # a bad file is a configuration error at load time
        out.append((tag, str(p)))
    return tuple(out)


def _parse_one(entry: Any, base_dir: Path | None, index: int) -> ModifyAction:
    where = f"modify[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping such as {{set: {{InstitutionName: X}}}}, got {entry!r}")
    ops = [k for k in entry if k in OPS]
    unknown = [k for k in entry if k not in OPS and k not in _OPTIONS]
    if unknown:
        hint = did_you_mean(str(unknown[0]), [*OPS, *_OPTIONS])
        raise ValueError(f"{where}: unknown key {unknown[0]!r}" + (f"; {hint}" if hint else "")
                         + f" (actions: {', '.join(OPS)}; options: {', '.join(_OPTIONS)})")
    if len(ops) != 1:
        raise ValueError(f"{where}: exactly one action ({', '.join(OPS)}) per entry, got "
                         f"{', '.join(map(str, ops)) or 'none'}")
    op = ops[0]
    when = entry.get("when")
    if when is not None:
        if not isinstance(when, str):
            raise ValueError(f"{where}: when: expected an expression string, got {when!r}")
        try:
            compile_match(when)
        except ExpressionError as exc:
            raise ValueError(f"{where}: when: {exc.message}" + (f"; {exc.hint}" if exc.hint else "")) from None
    record = entry.get("record_original", False)
    if not isinstance(record, bool):
        raise ValueError(f"{where}: record_original: expected true or false, got {record!r}")
    on_missing = entry.get("on_missing", "keep")
    if on_missing not in ("keep", "fail") or (op != "lookup" and "on_missing" in entry):
        raise ValueError(f"{where}: on_missing: keep or fail, and only with lookup")
    try:
        spec: Any
        if op == "set":
            spec = _parse_set(entry[op])
        elif op == "delete":
            spec = _parse_delete(entry[op])
        elif op == "copy":
            spec = _parse_copy(entry[op])
        elif op == "regex":
            spec = _parse_regex(entry[op])
        else:
            spec = _parse_lookup(entry[op], base_dir)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return ModifyAction(op, spec, when, record, on_missing)


def parse_modify(value: Any, base_dir: Path | None) -> tuple[ModifyAction, ...]:
    """A ``modify:`` list from YAML; ValueError (message for the operator) when invalid.
    ``base_dir``: relative lookup CSV paths are relative to it (the configuration's folder)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of actions ({', '.join(OPS)}), got {value!r}")
    return tuple(_parse_one(entry, base_dir, i) for i, entry in enumerate(value))


# -- lookup tables ------------------------------------------------------------------------------

def read_table(path: Path) -> dict[str, str]:
    """A lookup CSV (old,new); ValueError naming the file and line."""
    table: dict[str, str] = {}
    lines: dict[str, int] = {}
    first = True
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                cells = [c.strip() for c in row]
                if not cells or not any(cells) or cells[0].startswith("#"):
                    continue
                header, first = first and [c.lower() for c in cells] == ["old", "new"], False
                if header:
                    continue
                where = f"{path}:{reader.line_num}"
                if len(cells) != 2:
                    raise ValueError(f"{where}: expected 2 columns (old,new), got {len(cells)}")
                old, new = cells
                if old in table and table[old] != new:
                    raise ValueError(f"{where}: {old!r} is mapped again (to {new!r}; line "
                                     f"{lines[old]} maps it to {table[old]!r})")
                table[old], lines[old] = new, reader.line_num
    except OSError as exc:
        raise ValueError(f"lookup table {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"lookup table {path}: {exc}") from None
    return table


# -- applying -----------------------------------------------------------------------------------

def _plain(v: Any) -> str | int | float | bytes:
    if isinstance(v, PersonName):
        return str(v)
    if isinstance(v, (str, bytes)):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    return str(v)


def attr_value(elem: DataElement) -> Any:
    """An element's value in the form rulelang's ``Attrs`` holds (a tuple when multi-valued)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, DicomSequence):
        return tuple(range(len(value)))        # present when it has items
    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(_plain(v) for v in value)
    return _plain(value)


def display(elem: DataElement | None) -> str | None:
    """An element's value as text for a preview; None when absent."""
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, DicomSequence):
        return f"<{len(value)} item(s)>"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _is_empty(elem: DataElement | None) -> bool:
    return elem is None or elem.value is None or elem.value == "" or (
        isinstance(elem.value, (MultiValue, list, tuple, bytes)) and len(elem.value) == 0)


@dataclass(slots=True)
class _Compiled:
    action: ModifyAction
    matcher: Matcher | None
    patterns: tuple[tuple[int, re.Pattern[str], str], ...] = ()
    tables: dict[int, dict[str, str]] = field(default_factory=dict)


class Modifier:
    """A compiled ``modify:`` list; ``by`` names it in changes ("rule:X" / "destination:Y")."""

    def __init__(self, actions: Sequence[ModifyAction], by: str) -> None:
        self.actions = tuple(actions)
        self.by = by
        self._compiled: list[_Compiled] = []
        for a in self.actions:
            c = _Compiled(a, compile_match(a.when) if a.when is not None else None)
            if a.op == "regex":
                c.patterns = tuple((tag, re.compile(p), r) for tag, p, r in a.spec)
            elif a.op == "lookup":
                c.tables = {tag: read_table(Path(p)) for tag, p in a.spec}
            self._compiled.append(c)

    @property
    def has_lookups(self) -> bool:
        return any(a.op == "lookup" for a in self.actions)

    @property
    def uses_context(self) -> bool:
        """Whether a ``when`` reads called_ae or peer_ip (not on the sender's claim)."""
        return any(a.when is not None and re.search(r"\b(called_ae|peer_ip)\b", a.when)
                   for a in self.actions)

    def reload(self) -> None:
        """Read lookup CSV files again (SIGHUP); a bad file keeps the old table (logged)."""
        for c in self._compiled:
            if c.action.op != "lookup":
                continue
            for tag, p in c.action.spec:
                try:
                    c.tables[tag] = read_table(Path(p))
                except ValueError as exc:
                    log.error("%s: lookup table for %s not reloaded, the previous one is kept: %s",
                              self.by, _keyword(tag) or _tag_name(tag), exc)
                else:
                    log.info("%s: lookup table %s reloaded (%d entries)", self.by, p, len(c.tables[tag]))

    def apply(self, ds: Dataset, context: Mapping[str, str]) -> list[Change]:
        """Change ``ds`` in place; the changes made (none: nothing applied).
        ModifyError when an action must not let the object go out (lookup ``on_missing: fail``)."""
        changes: list[Change] = []
        for c in self._compiled:
            if c.matcher is not None:
                attrs = {tag: attr_value(ds[tag]) for tag in c.matcher.tags if tag in ds}
                if not c.matcher.predicate(attrs, context):
                    continue
            old: dict[int, DataElement] = {}
            made = self._run(c, ds, old)
            if c.action.record_original and old:
                made.append(_record_original(ds, old.values(), self.by))
            changes.extend(made)
        return changes

    # -- the actions ---------------------------------------------------------------------------

    def _change(self, ds: Dataset, tag: int, new: DataElement | None, action: str,
                old: dict[int, DataElement]) -> Change | None:
        before = ds.get(tag)
        before_elem = ds[tag] if before is not None else None
        before_text = display(before_elem)
        after_text = display(new)
        if before_elem is not None and new is not None and before_text == after_text \
                and before_elem.VR == new.VR:
            return None        # the same value: not a change
        if new is not None and new.VR in _TEXT_VRS:
            _check_charset(ds, new)
        if before_elem is not None and tag not in old:
            old[tag] = before_elem
        if new is None:
            if before_elem is None:
                return None
            del ds[tag]
        else:
            ds[tag] = new
        return Change(_tag_name(tag), _keyword(tag), action, before_text, after_text, self.by)

    def _run(self, c: _Compiled, ds: Dataset, old: dict[int, DataElement]) -> list[Change]:
        a = c.action
        out: list[Change | None] = []
        if a.op == "set":
            for tag, vr, value in a.spec:
                out.append(self._change(ds, tag, DataElement(tag, vr, list(value) if isinstance(value, tuple) else value),
                                        "set", old))
        elif a.op == "delete":
            for kind, arg in a.spec:
                for tag in _delete_targets(ds, kind, arg):
                    out.append(self._change(ds, tag, None, "delete", old))
        elif a.op == "copy":
            for target, source in a.spec:
                if source not in ds:
                    continue
                out.append(self._change(ds, target, _copied(ds, ds[source], target), "copy", old))
        elif a.op == "regex":
            for tag, rx, repl in c.patterns:
                if tag not in ds or _is_empty(ds[tag]):
                    continue
                elem = ds[tag]
                values = [rx.sub(repl, str(v)) for v in _values(elem.value)]
                out.append(self._change(ds, tag, _text_element(ds, tag, elem.VR, values), "regex", old))
        else:
            for tag, _path in a.spec:
                if tag not in ds or _is_empty(ds[tag]):
                    continue
                elem, table = ds[tag], c.tables[tag]
                values = []
                for v in _values(elem.value):
                    text = str(v)
                    if text in table:
                        values.append(table[text])
                    elif a.on_missing == "fail":
                        raise ModifyError(
                            f"{self.by}: lookup of {_keyword(tag) or _tag_name(tag)} {text!r} found no "
                            f"entry in {_path} (on_missing: fail) for SOP Instance UID "
                            f"{ds.get('SOPInstanceUID', '?')}; not sent unmapped: add the value to the "
                            "table and send SIGHUP, then retry the object")
                    else:
                        values.append(text)
                out.append(self._change(ds, tag, _text_element(ds, tag, elem.VR, values), "lookup", old))
        return [ch for ch in out if ch is not None]


def _check_charset(ds: Dataset, elem: DataElement) -> None:
    """Non-ASCII text must be encodable in the object's Specific Character Set: pydicom's writer
    would otherwise put "?" in its place (or bytes the declared set does not define)."""
    texts = [str(v) for v in _values(elem.value)]
    if all(t.isascii() for t in texts):
        return
    what = f"{_keyword(elem.tag) or _tag_name(elem.tag)} of SOP Instance UID {ds.get('SOPInstanceUID', '?')}"
    declared = ds.get("SpecificCharacterSet")
    if not declared:
        raise ModifyError(f"{what}: non-ASCII value {texts!r} but the object declares no Specific "
                          "Character Set (0008,0005); not sent with a mis-encoded value")
    encodings = charset.convert_encodings(list(_values(declared)))
    for t in texts:
        if not t.isascii() and not any(_encodes(t, enc) for enc in encodings):
            raise ModifyError(f"{what}: {t!r} cannot be written in the object's Specific Character "
                              f"Set {declared!r}; not sent with a mis-encoded value")


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _values(value: Any) -> list[Any]:
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _text_element(ds: Dataset, tag: int, vr: str, values: list[str]) -> DataElement:
    what = f"{_keyword(tag) or _tag_name(tag)} of SOP Instance UID {ds.get('SOPInstanceUID', '?')}"
    for v in values:
        limit = _MAX_LEN.get(vr)
        if limit is not None and len(v) > limit:
            raise ModifyError(f"{what}: the new value {v!r} is {len(v)} characters, VR {vr} "
                              f"allows {limit}; not sent with a truncated value")
    return DataElement(tag, vr, values[0] if len(values) == 1 else values)


def _copied(ds: Dataset, src: DataElement, target: int) -> DataElement:
    vr = str(datadict.dictionary_VR(target)) if datadict.dictionary_has_tag(target) else src.VR
    if vr == src.VR or " or " in vr:
        return DataElement(target, src.VR, src.value)
    if vr in _TEXT_VRS and src.VR in _TEXT_VRS | _INT_VRS | _FLOAT_VRS:
        return _text_element(ds, target, vr, [str(v) for v in _values(src.value)])
    raise ModifyError(f"copy {_keyword(src.tag) or _tag_name(src.tag)} ({src.VR}) to "
                      f"{_keyword(target) or _tag_name(target)} ({vr}): the VRs do not convert")


def _delete_targets(ds: Dataset, kind: str, arg: Any) -> list[int]:
    if kind == "tag":
        return [arg] if arg in ds else []
    tags = [int(t) for t in ds.keys() if t.group & 1]
    if kind == "private":
        return tags
    blocks = set()
    for t in tags:
        if 0x10 <= t & 0xFFFF <= 0xFF:
            value = ds[t].value
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if text.strip(" \0") == arg:
                blocks.add((t >> 16, t & 0xFF))
    return [t for t in tags if (t >> 16, t & 0xFFFF) in {(g, b) for g, b in blocks}
            or (t >> 16, (t & 0xFFFF) >> 8) in blocks]


def _record_original(ds: Dataset, old: Any, by: str) -> Change:
    """PS3.3 C.12.1.1.9: one Original Attributes Sequence item holding the replaced values."""
    modified = Dataset()
    for elem in old:
        modified.add(elem)
    item = Dataset()
    item.ModifiedAttributesSequence = DicomSequence([modified])
    item.SourceOfPreviousValues = ""
    item.AttributeModificationDateTime = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S.%f+0000")
    item.ModifyingSystem = "fastroute"
    item.ReasonForTheAttributeModification = "COERCE"
    before = display(ds[_ORIGINAL_ATTRIBUTES]) if _ORIGINAL_ATTRIBUTES in ds else None
    if _ORIGINAL_ATTRIBUTES in ds:
        ds.OriginalAttributesSequence.append(item)
    else:
        ds.OriginalAttributesSequence = DicomSequence([item])
    return Change(_tag_name(_ORIGINAL_ATTRIBUTES), "OriginalAttributesSequence", "record", before,
                  display(ds[_ORIGINAL_ATTRIBUTES]), by)


__all__ = ["ModifyAction", "ModifyError", "Modifier", "attr_value", "display", "parse_modify",
           "parse_tag", "read_table"]
