"""PS3.15 Annex E de-identification (issue 15): the Basic Application Level Confidentiality
Profile and its options, applied by Table E.1-1 (:mod:`fastroute.content.table`).

One pass over the dataset, every nesting depth, one dict lookup per element. What each action
does here (the choices the standard leaves to an implementation):

- X removes. Z empties (a sequence: no items). Compound actions: see ``table``.
- D and U are keyed and deterministic (HMAC-SHA256 with the destination's key), so the same
  input and key give the same output on every object, run and router: a UI becomes
  ``2.25.<decimal of 16 digest bytes>`` (≤ 44 characters), so a study's SOP/Series/Study/Frame
  of Reference UIDs and every reference to them stay consistent; a name becomes ``ANON^<hex>``;
  other strings a hex pseudonym fitting the VR; numbers 0; dates 19000101 (DA),
  19000101000000 (DT), 000000 (TM). A D sequence keeps its items, each de-identified by the
  table; Institution Code Sequence and Person Identification Code Sequence are emptied instead,
  since the codes in them identify and are not themselves in the table.
- Patient's Name, Patient ID, Accession Number and Study ID (Z in the table) get keyed
  pseudonyms instead of empty values, so a research destination can link a patient's objects.
- Dates the table does not list (Instance Creation Date, Date of Last Calibration, ...) are
  not left real: without a date option they get the dummy date (stricter than the table).
- Retain Longitudinal Modified Dates: every DA/DT value anywhere (in the table or not, e.g.
  Instance Creation Date) is shifted back by a per-patient keyed offset of 1-3650 days (keyed on
  the original Patient ID); DT keeps its time; TM is kept. Longitudinal Temporal Information
  Modified (0028,0303) says MODIFIED (UNMODIFIED with full dates, REMOVED otherwise).
- C on text (Clean Descriptors, Patient Characteristics): the text is kept with every
  occurrence (case-insensitive) of the patient's name components (2+ characters), Patient ID,
  Other Patient IDs, Accession Number and birth date removed, and spaces collapsed.
- Clean Structured Content: Content/Acquisition Context/Specimen Preparation Sequence items are
  kept and recursed; Text Value cleaned as above, Person Name pseudonymised, UIDs replaced.
  Without the option the Content Sequence (D) keeps its items too, but Text Values become
  ``ANONYMIZED``.
- Clean Graphics: overlay and curve bitmaps are kept unchanged (not inspected); overlay
  comments and Graphic Annotation text are cleaned. Without it, the whole overlay group
  (60xx) and curves (50xx) are removed, not only Overlay Data, so no overlay is left half.
- Private elements are removed; with Retain Safe Private, those on ``safe_private`` are kept
  (no built-in list: PS3.15 Table E.3.10-1 is not shipped; list what your devices need).
- Burned In Annotation YES, or absent for ``burned_in_modalities``: quarantined, unchanged.
- Pixel Data is never read or changed; the file meta is not part of the dataset. Group
  lengths (gggg,0000), retired and wrong once elements change, are dropped.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from fastroute.content.changes import Change
from fastroute.content.table import (BASIC_CODE, CLEAN_DATE, CLEAN_GRAPH, CLEAN_PRIVATE,
                                     CLEAN_STRUCT, CLEAN_TEXT, DUMMY, EMPTY, KEEP, OPTIONS,
                                     REMOVE, UID, Compiled, compile_options, table_version)
from fastroute.errors import ConfigError

PROFILES = ("basic",)
# Modalities whose devices commonly burn patient text into pixels: ultrasound, endoscopy,
# external-camera photography, and secondary capture / other (screenshots, scanned paper).
DEFAULT_BURNED_IN_MODALITIES = ("US", "ES", "XC", "OT", "SC")


@dataclass(frozen=True, slots=True)
class DeidentifyConfig:
    """A destination's ``deidentify:`` section."""

    profile: str = "basic"
    options: tuple[str, ...] = ()
    key: str = ""                    # env:NAME or file:PATH (never the key itself)
    quarantine_burned_in: bool = True
    # absent Burned In Annotation quarantines these modalities too (quarantine_burned_in)
    burned_in_modalities: tuple[str, ...] = DEFAULT_BURNED_IN_MODALITIES
    # Retain Safe Private: "CREATOR|GGGG,xxEE" entries (e.g. "GEMS_PARM_01|0043,xx27")
    safe_private: tuple[str, ...] = ()


_KEYS = ("profile", "options", "key", "quarantine_burned_in", "burned_in_modalities", "safe_private")
_SAFE_RE = re.compile(r"^(?P<creator>[^|]{1,64})\|(?P<group>[0-9A-Fa-f]{4}),xx(?P<elem>[0-9A-Fa-f]{2})$")


def _meant(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]}? " if close else ""


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def parse_deidentify(value: Any, base_dir: Path | None) -> DeidentifyConfig:
    """A ``deidentify:`` mapping from YAML; ValueError (message for the operator) when invalid.
    The key is only checked for its form here: it is read where the sender starts
    (:func:`resolve_key`), so ``fastroute check`` works on a machine without it."""
    if not isinstance(value, dict):
        raise ValueError("deidentify must be a mapping: {profile: basic, options: [...], key: env:NAME}")
    for k in value:
        if k not in _KEYS:
            raise ValueError(f"unknown key {k!r}; {_meant(str(k), _KEYS)}valid: {', '.join(_KEYS)}")
    profile = value.get("profile", "basic")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    options = _strings(value.get("options"), "options")
    valid = tuple(OPTIONS)
    for o in options:
        if o not in OPTIONS:
            raise ValueError(f"unknown option {o!r}; {_meant(o, valid)}valid: {', '.join(valid)}")
    if {"retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"} <= set(options):
        raise ValueError("retain-longitudinal-full-dates and retain-longitudinal-modified-dates "
                         "exclude each other: choose one")
    key = value.get("key")
    if not isinstance(key, str) or not (key.startswith("env:") and len(key) > 4
                                        or key.startswith("file:") and len(key) > 5):
        raise ValueError("key must be env:NAME (an environment variable) or file:PATH, never the "
                         "key itself")
    if key.startswith("file:") and base_dir is not None and not Path(key[5:]).is_absolute():
        key = f"file:{base_dir / key[5:]}"
    qb = value.get("quarantine_burned_in", True)
    if not isinstance(qb, bool):
        raise ValueError("quarantine_burned_in must be true or false")
    mods = value.get("burned_in_modalities")
    modalities = DEFAULT_BURNED_IN_MODALITIES if mods is None else tuple(
        m.upper() for m in _strings(mods, "burned_in_modalities"))
    safe = _strings(value.get("safe_private"), "safe_private")
    for s in safe:
        if not _SAFE_RE.match(s) or int(_SAFE_RE.match(s)["group"], 16) % 2 == 0:  # type: ignore[index]
            raise ValueError(f"safe_private entry {s!r}: expected CREATOR|GGGG,xxEE with GGGG odd, "
                             "e.g. GEMS_PARM_01|0043,xx27")
    return DeidentifyConfig(profile, tuple(dict.fromkeys(options)), key, qb, modalities, safe)


def resolve_key(cfg: DeidentifyConfig) -> bytes:
    """The HMAC key from ``env:NAME`` or ``file:PATH``; ConfigError naming it when missing or
    empty. Called where the sender starts: without a key nothing de-identified is sent."""
    if cfg.key.startswith("env:"):
        name = cfg.key[4:]
        val = os.environ.get(name, "")
        if not val:
            raise ConfigError(f"de-identification key: environment variable {name} is "
                              f"{'empty' if name in os.environ else 'not set'}", key="deidentify.key",
                              hint=f"export {name} with a secret of 16+ characters, the same on every "
                                   "router that must produce the same pseudonyms")
        return val.encode()
    if cfg.key.startswith("file:"):
        path = Path(cfg.key[5:])
        try:
            data = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"de-identification key file {path}: {exc.strerror}",
                              key="deidentify.key", hint="create it (mode 0600) with a secret") from None
        if not data:
            raise ConfigError(f"de-identification key file {path} is empty", key="deidentify.key",
                              hint="write a secret of 16+ characters into it")
        return data
    raise ConfigError(f"de-identification key {cfg.key!r}: expected env:NAME or file:PATH",
                      key="deidentify.key")


# -- keyed deterministic values -----------------------------------------------------------------

def keyed_uid(key: bytes, uid: str) -> str:
    """``2.25.`` + the decimal of the first 16 bytes of HMAC-SHA256(key, uid): a valid UI of at
    most 44 characters, the same for the same uid and key everywhere."""
    d = hmac.new(key, b"uid\0" + uid.strip().encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(d[:16], "big"))


def _hex(key: bytes, kind: bytes, value: str, n: int) -> str:
    return hmac.new(key, kind + b"\0" + value.encode(), hashlib.sha256).hexdigest()[:n].upper()


_MAXLEN = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "LT": 10240, "PN": 64,
           "SH": 16, "ST": 1024, "UC": 64, "UT": 64, "UR": 64}
_DUMMY_DATE = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
_NUMERIC_BIN = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"}
_PSEUDONYM_Z = {0x00100010, 0x00100020, 0x00080050, 0x00200010}   # name, PID, accession, study ID
_EMPTY_INSTEAD_OF_D = {0x00080082, 0x00401101}     # Institution / Person Identification Code Seq
_STRUCTURED = {0x0040A730, 0x00400555, 0x00400610}  # Content, Acquisition Context, Specimen Prep
_TEXT_VALUE = 0x0040A160
_GRAPHIC_TEXT = 0x00700006                          # Unformatted Text Value
_PIXEL_DATA = 0x7FE00010
_TEXT_VRS = {"LO", "LT", "SH", "ST", "UT", "UC", "PN"}


def _fmt(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _display(elem: DataElement) -> str | None:
    if elem.VR == "SQ":
        return f"{len(elem.value)} item(s)"
    v = elem.value
    if v is None:
        return ""
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return str(v)


class _Run:
    """The state of one ``apply``: the patient's identifiers (for cleaning and the date shift)
    and the changes made."""

    def __init__(self, d: Deidentifier, ds: Dataset) -> None:
        self.d = d
        self.changes: list[Change] = []
        pid = str(ds.get("PatientID", "") or "")
        name = str(ds.get("PatientName", "") or "")
        words = {w for w in re.split(r"[\^=\s,]+", name) if len(w) >= 2}
        for k in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs"):
            v = ds.get(k)
            if v:
                words.update(str(x) for x in (v if isinstance(v, (list, tuple)) or
                                              type(v).__name__ == "MultiValue" else [v]) if str(x))
        self.clean_re = (re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)),
                                    re.IGNORECASE) if words else None)
        self.shift_days = 0
        if d.modified_dates:
            h = hmac.new(d.key, b"shift\0" + (pid or name).encode(), hashlib.sha256).digest()
            self.shift_days = -(int.from_bytes(h[:4], "big") % 3650 + 1)

    def change(self, path: str, tag: int, action: str, old: str | None, new: str | None) -> None:
        self.changes.append(Change(path, keyword_for_tag(tag) if tag & 0x10000 == 0 else "",
                                   action, old, new, self.d.by))

    # -- value functions ----------------------------------------------------------------------

    def clean_text(self, text: str) -> str:
        if self.clean_re is None:
            return text
        return re.sub(r"\s{2,}", " ", self.clean_re.sub("", text)).strip()

    def shift(self, vr: str, value: str) -> str:
        s = value.strip()
        if len(s) < 8 or not s[:8].isdigit():
            return _DUMMY_DATE[vr]
        try:
            day = _dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
            day = day + _dt.timedelta(days=self.shift_days)
        except (ValueError, OverflowError):
            return _DUMMY_DATE[vr]
        return day.strftime("%Y%m%d") + (s[8:] if vr == "DT" else "")

    def dummy(self, tag: int, vr: str, value: Any) -> Any:
        key = self.d.key
        if vr == "UI":
            return self.uid(value)
        if vr == "PN":
            return "ANON^" + _hex(key, b"pn", str(value), 12) if value else "ANON"
        if vr in _DUMMY_DATE:
            return _DUMMY_DATE[vr]
        if vr in ("IS", "DS"):
            return "0"
        if vr in _NUMERIC_BIN:
            return 0
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            return b""
        if vr == "CS":
            return "ANONYMIZED"
        n = min(_MAXLEN.get(vr, 64), 16)
        return _hex(key, b"id", str(value), n) if value else "ANONYMIZED"[:n]

    def uid(self, value: Any) -> Any:
        if value is None or value == "":
            return value
        if isinstance(value, str):
            return keyed_uid(self.d.key, value)
        return [keyed_uid(self.d.key, str(v)) for v in value]

    # -- the walk -----------------------------------------------------------------------------

    def walk(self, ds: Dataset, prefix: str, structured: bool) -> None:
        d = self.d
        c = d.compiled
        by_tag = c.by_tag
        remove_overlays = c.overlay_data == REMOVE
        private_tags: list[int] = []
        for btag in list(ds.keys()):
            tag = int(btag)
            if tag == _PIXEL_DATA:
                continue
            group = tag >> 16
            if tag & 0xFFFF == 0:          # a (retired) group length: wrong once anything changed
                del ds[btag]
                continue
            if group & 1:
                private_tags.append(tag)
                continue
            act = by_tag.get(tag)
            if act is None:
                if 0x5000 <= group <= 0x501E:
                    act = c.curve
                elif 0x6000 <= group <= 0x601E:
                    elem_no = tag & 0xFFFF
                    act = (c.overlay_data if elem_no == 0x3000 else c.overlay_comments
                           if elem_no == 0x4000 else REMOVE if remove_overlays else None)
            raw_vr = ds.get_item(btag).VR  # type: ignore[union-attr]
            vr = raw_vr if raw_vr and raw_vr != "UN" else _vr(tag)   # UN: what pydicom converts to
            if act is None or act == KEEP:
                if vr in ("DA", "DT") and not d.full_dates:
                    # dates the table does not list (Instance Creation Date, ...): shifted with
                    # modified dates, else dummied, so no real date survives either way
                    self.apply_one(ds, btag, prefix, CLEAN_DATE if d.modified_dates else DUMMY, vr)
                elif vr == "SQ":
                    self.recurse(ds, btag, prefix, structured)
                elif structured and tag == _TEXT_VALUE or tag == _GRAPHIC_TEXT:
                    clean = d.clean_struct if tag == _TEXT_VALUE else d.clean_graph
                    self.apply_one(ds, btag, prefix, CLEAN_TEXT if clean else DUMMY, vr)
                elif structured and vr == "PN":
                    self.apply_one(ds, btag, prefix, DUMMY, vr)
                continue
            self.apply_one(ds, btag, prefix, act, vr)
        if private_tags:
            self.private(ds, private_tags, prefix)

    def recurse(self, ds: Dataset, btag: BaseTag, prefix: str, structured: bool) -> None:
        elem = ds[btag]
        base = f"{prefix}{_fmt(int(btag))}"
        for i, item in enumerate(elem.value or ()):
            self.walk(item, f"{base}[{i}]", structured)

    def apply_one(self, ds: Dataset, btag: BaseTag, prefix: str, act: str, vr: str) -> None:
        tag = int(btag)
        path = f"{prefix}{_fmt(tag)}"
        if act == REMOVE:
            old = _display(ds[btag])
            del ds[btag]
            self.change(path, tag, "delete", old, None)
            return
        elem = ds[btag]
        vr = elem.VR if elem.VR != "UN" else vr
        if vr == "SQ":
            if act == EMPTY or (act == DUMMY and tag in _EMPTY_INSTEAD_OF_D):
                if elem.value:
                    old = _display(elem)
                    elem.value = Sequence()
                    self.change(path, tag, "empty", old, "0 item(s)")
            elif act == CLEAN_GRAPH or act == CLEAN_TEXT:
                self.recurse(ds, btag, prefix, False)
            else:                      # D, U*, C-struct: items kept, each de-identified
                self.recurse(ds, btag, prefix, tag in _STRUCTURED or act == CLEAN_STRUCT)
            return
        old_v = elem.value
        if act == EMPTY and tag in _PSEUDONYM_Z:
            act = DUMMY
        if act == EMPTY:
            if old_v in (None, "", b""):
                return
            new_v: Any = None
            name = "empty"
        elif act == DUMMY:
            if old_v in (None, "") and vr not in ("PN",):
                return
            new_v = self.dummy(tag, vr, old_v)
            name = "uid" if vr == "UI" else "dummy"
        elif act == UID:
            new_v = self.uid(old_v)
            name = "uid"
        elif act == CLEAN_DATE:
            if vr not in ("DA", "DT") or not old_v:
                return             # TM and time zone offsets are kept with modified dates
            new_v = (self.shift(vr, str(old_v)) if isinstance(old_v, str)
                     else [self.shift(vr, str(v)) for v in old_v])
            name = "shift"
        elif act in (CLEAN_TEXT, CLEAN_GRAPH, CLEAN_STRUCT):
            if vr not in _TEXT_VRS or not old_v:
                return             # bitmaps and codes under Clean Graphics are kept
            if vr == "PN":
                new_v = self.dummy(tag, vr, old_v)
            else:
                new_v = (self.clean_text(str(old_v)) if isinstance(old_v, str)
                         else [self.clean_text(str(v)) for v in old_v])
            name = "clean"
        elif act == CLEAN_PRIVATE:
            return
        else:
            return
        if new_v == old_v:
            return
        old = _display(elem)
        elem.value = new_v
        self.change(path, tag, name, old, _display(elem))

    def private(self, ds: Dataset, tags: list[int], prefix: str) -> None:
        """Private elements: removed, unless Retain Safe Private and on the safe list (their
        creator element is kept with them)."""
        safe = self.d.safe if self.d.compiled.private == CLEAN_PRIVATE else None
        creators: dict[tuple[int, int], str] = {}
        if safe:
            for t in tags:
                if 0x10 <= t & 0xFFFF <= 0xFF:
                    creators[(t >> 16, t & 0xFF)] = str(ds[t].value).strip()
        safe_creators = {(c, g) for c, g, _ in safe} if safe else set()
        for t in tags:
            group, el = t >> 16, t & 0xFFFF
            if safe:
                if 0x10 <= el <= 0xFF:
                    if (creators.get((group, el), ""), group) in safe_creators:
                        continue
                elif (creators.get((group, el >> 8), ""), group, el & 0xFF) in safe:
                    elem = ds[t]
                    if elem.VR == "SQ":
                        self.recurse(ds, BaseTag(t), prefix, False)
                    continue
            old = _raw_display(ds.get_item(t))   # not converted: private VRs need a dictionary
            del ds[t]
            self.change(f"{prefix}{_fmt(t)}", t, "delete", old, None)


def _raw_display(elem: Any) -> str | None:
    """A private element's old value for the preview, read from its raw bytes (converting it
    would look its VR up in the private dictionaries: 80 % of the time on a GE CT)."""
    if elem is None:
        return None
    if isinstance(elem, DataElement):
        return _display(elem)
    v = elem.value
    if elem.VR == "SQ" or elem.VR is None and v is None:
        return "sequence"
    if v is None:
        return ""
    if elem.VR in _TEXT_VRS or elem.VR in ("CS", "DS", "IS", "DA", "TM", "DT", "UI", "AS"):
        return bytes(v).decode("latin-1").strip(" \0")
    return f"<{len(v)} bytes>"


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def deidentifier_for(cfg: DeidentifyConfig) -> Deidentifier:
    """The engine with its key resolved: ConfigError (naming the variable or file) without one,
    so a sender that calls this at start never sends a copy it could not de-identify."""
    return Deidentifier(cfg, resolve_key(cfg))


class Deidentifier:
    """The profile with its options, keyed; ``by`` is "deidentify:PROFILE"."""

    def __init__(self, cfg: DeidentifyConfig, key: bytes) -> None:
        if not key:
            raise ValueError("a de-identification key is required")
        self.cfg = cfg
        self.key = key
        self.by = f"deidentify:{cfg.profile}"
        opts = frozenset(cfg.options)
        self.compiled: Compiled = compile_options(opts)
        self.modified_dates = "retain-longitudinal-modified-dates" in opts
        self.full_dates = "retain-longitudinal-full-dates" in opts
        self.clean_struct = "clean-structured-content" in opts
        self.clean_graph = "clean-graphics" in opts
        self.safe: set[tuple[str, int, int]] = set()
        for s in cfg.safe_private:
            m = _SAFE_RE.match(s)
            if m:
                self.safe.add((m["creator"].strip(), int(m["group"], 16), int(m["elem"], 16)))
        self.method = self._method_text()
        self._burned_in = frozenset(m.upper() for m in cfg.burned_in_modalities)

    def _method_text(self) -> list[str]:
        """De-identification Method (LO, ≤ 64 characters a value): profile, options, table."""
        parts = [f"fastroute PS3.15 E.1-1 {self.cfg.profile}"] + [o for o in OPTIONS if o in self.cfg.options]
        parts.append(f"table {table_version().split(' ')[0]}")
        return [p[:64] for p in parts]

    def quarantine_reason(self, ds: Dataset) -> str:
        """Why ``ds`` must not go out de-identified by this profile ("" when it may)."""
        if not self.cfg.quarantine_burned_in:
            return ""
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned == "YES":
            return "BurnedInAnnotation YES"
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if not burned and modality in self._burned_in:
            return f"BurnedInAnnotation absent for modality {modality}"
        return ""

    def apply(self, ds: Dataset) -> tuple[list[Change], str]:
        """De-identify ``ds`` in place: (changes, quarantine reason or ""). A quarantined
        object is left unchanged."""
        reason = self.quarantine_reason(ds)
        if reason:
            return [], reason
        run = _Run(self, ds)
        run.walk(ds, "", False)
        self._mark(ds, run)
        meta = getattr(ds, "file_meta", None)   # a file read for a preview; the spool keeps none
        if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return run.changes, ""

    def _mark(self, ds: Dataset, run: _Run) -> None:
        """Patient Identity Removed, De-identification Method (+ Code Sequence), and what the
        dates now are (Longitudinal Temporal Information Modified)."""
        add: list[tuple[str, str, Any]] = [("PatientIdentityRemoved", "CS", "YES"),
                                           ("DeidentificationMethod", "LO", self.method)]
        lti = ("MODIFIED" if self.modified_dates else "UNMODIFIED" if self.full_dates else "REMOVED")
        add.append(("LongitudinalTemporalInformationModified", "CS", lti))
        for kw, vr, val in add:
            old = ds.get(kw)
            old_s = None if old is None else str(old)
            setattr(ds, kw, val)
            new_s = str(ds[kw].value)
            if old_s != new_s:
                run.change(_fmt(int(ds[kw].tag)), int(ds[kw].tag), "set", old_s, new_s)
        seq = Sequence()
        for code, meaning in [BASIC_CODE] + [(OPTIONS[o][1], OPTIONS[o][2]) for o in OPTIONS
                                             if o in self.cfg.options]:
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = seq
        run.change("(0012,0064)", 0x00120064, "set", None, f"{len(seq)} item(s)")


__all__: list[str] = ["DeidentifyConfig", "Deidentifier", "deidentifier_for", "parse_deidentify", "resolve_key",
                      "keyed_uid", "DEFAULT_BURNED_IN_MODALITIES"]
