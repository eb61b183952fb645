"""PS3.15 Table E.1-1 as data: read once, compiled per option set into a tag → action dict.

The table (``profiles/ps3.15-table-e.1-1.csv``) keeps the standard's own columns; this module
decides what one set of options means for each row, so the engine does one dict lookup per
element. Compound basic actions are resolved to the one that keeps type 1/2 attributes present
(PS3.15 E.1.1 lets an implementation pick by IOD; we do not know the IOD's type per attribute,
so we always pick the safe-for-validity one): X/Z → Z, X/D → D, Z/D → D, X/Z/D → D, X/Z/U* → U.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

TABLE_FILE = "ps3.15-table-e.1-1.csv"

# option name (config) → (table column, DICOM CID 7050 code value, code meaning)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain-uids": ("rtn_uids", "113110", "Retain UIDs Option"),
    "retain-device-identity": ("rtn_dev_id", "113109", "Retain Device Identity Option"),
    "retain-institution-identity": ("rtn_inst_id", "113112", "Retain Institution Identity Option"),
    "retain-patient-characteristics": ("rtn_pat_chars", "113108",
                                       "Retain Patient Characteristics Option"),
    "retain-longitudinal-full-dates": ("rtn_long_full_dates", "113106",
                                       "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain-longitudinal-modified-dates": ("rtn_long_modif_dates", "113107",
                                           "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain-safe-private": ("rtn_safe_priv", "113111", "Retain Safe Private Option"),
    "clean-descriptors": ("clean_desc", "113105", "Clean Descriptors Option"),
    "clean-structured-content": ("clean_struct_cont", "113104", "Clean Structured Content Option"),
    "clean-graphics": ("clean_graph", "113103", "Clean Graphics Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")

# Actions after compilation. "C" is split by what is cleaned, so the engine need not know columns.
KEEP, REMOVE, EMPTY, DUMMY, UID = "K", "X", "Z", "D", "U"
CLEAN_TEXT = "C-text"        # descriptors, patient characteristics: identifiers removed from text
CLEAN_DATE = "C-date"        # modified dates: DA/DT shifted per patient, TM kept
CLEAN_STRUCT = "C-struct"    # structured content: items recursed, text values cleaned
CLEAN_GRAPH = "C-graph"      # graphics: kept, text in them cleaned, bitmaps not inspected
CLEAN_PRIVATE = "C-private"  # private: kept only when on the safe list

_COMPOUND = {"X/Z": EMPTY, "X/D": DUMMY, "Z/D": DUMMY, "X/Z/D": DUMMY, "X/Z/U*": UID}
_CLEAN_BY_COLUMN = {"rtn_pat_chars": CLEAN_TEXT, "clean_desc": CLEAN_TEXT,
                    "rtn_long_modif_dates": CLEAN_DATE, "clean_struct_cont": CLEAN_STRUCT,
                    "clean_graph": CLEAN_GRAPH, "rtn_safe_priv": CLEAN_PRIVATE}


@dataclass(frozen=True, slots=True)
class Row:
    """One row of Table E.1-1, as the standard gives it."""

    tag: str
    name: str
    basic: str
    options: dict[str, str]     # column → "K" | "C" | "X" (only the filled ones)


@dataclass(frozen=True, slots=True)
class Compiled:
    """The table for one option set: exact tags, plus the repeating-group patterns."""

    by_tag: dict[int, str]
    curve: str          # (50xx,xxxx): every element of an even group 5000-501E
    overlay_data: str   # (60xx,3000)
    overlay_comments: str   # (60xx,4000)
    private: str        # (gggg,eeee), gggg odd


def table_version() -> str:
    """The ``table-version`` line of the CSV header: what De-identification Method cites."""
    for line in _lines():
        if line.startswith("# table-version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _lines() -> list[str]:
    return resources.files("fastroute.content.profiles").joinpath(TABLE_FILE).read_text(
        encoding="utf-8").splitlines()


@functools.cache
def rows() -> tuple[Row, ...]:
    """Every row of the table, in the file's order."""
    body = [ln for ln in _lines() if not ln.startswith("#")]
    out = []
    for rec in csv.DictReader(body):
        opts = {c: rec[c] for c in (col for col, _, _ in OPTIONS.values()) if rec.get(c)}
        out.append(Row(rec["tag"], rec["name"], rec["basic"], opts))
    return tuple(out)


def _resolve(row: Row, columns: tuple[str, ...]) -> str:
    """One row's action under the chosen option columns: an option's K keeps, its C cleans,
    its X removes (Referenced Patient Sequence under Retain UIDs); otherwise the basic action."""
    for col in columns:
        act = row.options.get(col)
        if act == "K":
            return KEEP
        if act == "C":
            return _CLEAN_BY_COLUMN[col]
        if act == "X":
            return REMOVE
    return _COMPOUND.get(row.basic, row.basic)


@functools.cache
def compile_options(options: frozenset[str]) -> Compiled:
    """The table for ``options`` (names from :data:`OPTIONS`), cached per set. Retain options
    come before clean ones, so a row that both keeps and cleans (Allergies under Retain Patient
    Characteristics and Clean Descriptors) is cleaned only when no option keeps it verbatim."""
    columns = tuple(OPTIONS[o][0] for o in sorted(options, key=lambda o: (o.startswith("clean"), o)))
    by_tag: dict[int, str] = {}
    curve = overlay_data = overlay_comments = private = REMOVE
    for row in rows():
        act = _resolve(row, columns)
        t = row.tag
        if t.startswith("(50XX"):
            curve = act
        elif t == "(60XX,3000)":
            overlay_data = act
        elif t == "(60XX,4000)":
            overlay_comments = act
        elif t.startswith("(GGGG"):
            private = act
        else:
            by_tag[int(t[1:5] + t[6:10], 16)] = act
    return Compiled(by_tag, curve, overlay_data, overlay_comments, private)
