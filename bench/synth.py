"""Synthetic but valid DICOM studies (Part 10 files) for tests and benchmarks.

UIDs are fresh on every call (pydicom.uid.generate_uid), so studies never collide in a
destination; pixel data is seeded, so sizes and compressibility are reproducible. Each
object carries what a router looks at: patient/study/series identity, charset, a nested
sequence and a private block. No pytest dependency: the benchmark harness imports it too.
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian}


@dataclass(frozen=True)
class _Kind:
    sop_class: str
    multiframe_sop_class: str | None  # None: the IOD has no multi-frame variant here
    photometric: str
    samples: int
    geometry: bool  # Image Plane module (CT/MR slices)


_KINDS: dict[str, _Kind] = {
    "CT": _Kind("1.2.840.10008.5.1.4.1.1.2", None, "MONOCHROME2", 1, True),
    "MR": _Kind("1.2.840.10008.5.1.4.1.1.4", None, "MONOCHROME2", 1, True),
    "CR": _Kind("1.2.840.10008.5.1.4.1.1.1", None, "MONOCHROME2", 1, False),
    "DX": _Kind("1.2.840.10008.5.1.4.1.1.1.1", None, "MONOCHROME2", 1, False),
    # Ultrasound Image Storage / Ultrasound Multi-frame Image Storage, 8-bit RGB
    "US": _Kind("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1", "RGB", 3, False),
    # Secondary Capture / Multi-frame Grayscale Word (16 bit) or Byte (8 bit) SC
    "OT": _Kind("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.3", "MONOCHROME2", 1,
                False),
}

NON_ASCII_NAME = "Müller-Łukasiewicz^Zoë Ångström"
TINY = {"rows": 64, "cols": 64, "bits": 16}  # ~10 kB per object


def _pixels(rng: np.random.Generator, rows: int, cols: int, samples: int, bits_stored: int,
            dtype: type[np.unsignedinteger]) -> np.ndarray:
    """A disc phantom plus seeded noise: realistic enough to compress like an image."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    r2 = ((yy - rows / 2) / (rows / 2.2)) ** 2 + ((xx - cols / 2) / (cols / 2.2)) ** 2
    top = (1 << bits_stored) - 1
    body = np.where(r2 < 1.0, top * 0.45, top * 0.02) + (xx + yy) * (top * 0.1 / (rows + cols))
    noise = rng.normal(0.0, top * 0.02, size=(rows, cols))
    img: np.ndarray = np.clip(body + noise, 0, top).astype(dtype)
    if samples == 3:
        img = np.stack([img, np.roll(img, cols // 7, axis=1), img[::-1]], axis=-1)
    return img


def _encode(arr: np.ndarray, big_endian: bool) -> bytes:
    """Native pixel bytes; big-endian files carry 16-bit words byte-swapped."""
    if big_endian and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    data = arr.tobytes()
    return data + b"\x00" if len(data) % 2 else data


def make_study(
    out_dir: str | os.PathLike[str],
    modality: str = "CT",
    n_series: int = 1,
    n_instances: int = 10,
    rows: int = 512,
    cols: int = 512,
    bits: int = 16,
    patient_id: str | None = None,
    patient_name: str | None = None,
    non_ascii: bool = False,
    accession: str | None = None,
    study_description: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frames: int = 1,
    seed: int = 0,
    study_uid: str | None = None,
    tiny: bool = False,
) -> list[Path]:
    """Write one study of ``n_series`` x ``n_instances`` objects; returns their paths in order.

    ``modality`` picks the SOP class: CT, MR, CR, DX, US (RGB; multi-frame when frames > 1)
    or OT (Secondary Capture). ``bits`` is 8 or 16 (BitsAllocated; 16 stores 12 bits).
    ``non_ascii`` gives a non-ASCII patient name and study description with
    SpecificCharacterSet ISO_IR 192. ``transfer_syntax`` may be any syntax pydicom can encode
    (uncompressed, deflated, big endian, RLE, JPEG 2000 with pylibjpeg-openjpeg, ...).
    ``tiny`` forces 64 x 64 pixels (~10 kB objects). Files are named ``<SOPInstanceUID>.dcm``.
    """
    kind = _KINDS.get(modality.upper())
    if kind is None:
        raise ValueError(f"modality {modality!r}: expected one of {sorted(_KINDS)}")
    if frames > 1 and kind.multiframe_sop_class is None:
        raise ValueError(f"{modality}: frames={frames} needs a multi-frame IOD (use US or OT)")
    if bits not in (8, 16):
        raise ValueError(f"bits={bits}: expected 8 or 16")
    if tiny:
        rows, cols = TINY["rows"], TINY["cols"]
    if kind.samples == 3:
        bits = 8  # RGB ultrasound is 8 bits per sample
    transfer_syntax = UID(transfer_syntax)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    dtype = np.uint8 if bits == 8 else np.uint16
    bits_stored = 8 if bits == 8 else 12
    base = _pixels(rng, rows, cols, kind.samples, bits_stored, dtype)
    big_endian = transfer_syntax == ExplicitVRBigEndian
    compressed = transfer_syntax not in UNCOMPRESSED

    study_uid = study_uid or generate_uid()
    when = dt.datetime(2024, 1, 1, 8, 0, 0) + dt.timedelta(days=seed % 3650, minutes=seed % 600)
    charset = "ISO_IR 192" if non_ascii else None
    name = patient_name or (NON_ASCII_NAME if non_ascii else f"SYNTHETIC^PATIENT{seed}")
    description = study_description or (
        "Thorax – Übersicht (synthetisch)" if non_ascii else f"Synthetic {modality} study")
    patient_id = patient_id or f"SYN{seed:06d}"
    accession = accession or f"A{int(study_uid.rsplit('.', 1)[-1]) % 10**12:012d}"
    sop_class = (kind.multiframe_sop_class or kind.sop_class) if frames > 1 else kind.sop_class
    if modality.upper() == "OT" and frames > 1 and bits == 8:
        sop_class = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC

    paths: list[Path] = []
    for s in range(1, n_series + 1):
        static = _series_dataset(
            kind, modality.upper(), s, seed, charset, name, patient_id, accession, description,
            study_uid, when, sop_class, rows, cols, bits, bits_stored, frames)
        fast = not compressed
        implicit = transfer_syntax == ImplicitVRLittleEndian
        charset_value = static.get("SpecificCharacterSet", "iso8859")
        encoded = {elem.tag: _element_bytes(elem, implicit, not big_endian, charset_value)
                   for elem in static} if fast else {}
        for i in range(1, n_instances + 1):
            sop_uid = generate_uid()
            varying = Dataset()
            varying.SOPInstanceUID = sop_uid
            varying.ContentTime = (when + dt.timedelta(minutes=s, seconds=i)).strftime(
                "%H%M%S.%f")
            varying.InstanceNumber = i
            if kind.geometry:
                z = round(i * static.SliceThickness, 3)
                varying.ImagePositionPatient = [-cols * 0.35, -rows * 0.35, z]
                varying.SliceLocation = z
            varying.add_new(0x00091001, "LO", f"series {s} instance {i}")
            shift = (s * 31 + i * 7) % max(rows, 1)  # every object's pixels differ, cheaply
            if frames > 1:
                arr = np.stack([np.roll(base, shift + f, axis=0) for f in range(frames)])
            else:
                arr = np.roll(base, shift, axis=0)
            varying.add_new(0x7FE00010, "OB" if bits == 8 else "OW",
                            _encode(arr, big_endian and not compressed))
            path = out / f"{sop_uid}.dcm"
            if fast:
                # pydicom's writer costs ~6 ms an object; encoding the series' constant
                # elements once and splicing in the few that vary makes it ~10x faster.
                parts = dict(encoded)
                for elem in varying:
                    parts[elem.tag] = _element_bytes(elem, implicit, not big_endian,
                                                     charset_value)
                body = b"".join(parts[tag] for tag in sorted(parts))
                if transfer_syntax == DeflatedExplicitVRLittleEndian:
                    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                    body = deflater.compress(body) + deflater.flush()
                meta = _file_meta(sop_class, sop_uid, transfer_syntax)
                path.write_bytes(b"\0" * 128 + b"DICM" + meta + body)
            else:
                ds = copy.deepcopy(static)  # compress() may rewrite shared attributes
                ds.update(varying)
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
                ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.compress(transfer_syntax, generate_instance_uid=False)
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
    return paths


def _series_dataset(
    kind: _Kind, modality: str, s: int, seed: int, charset: str | None, name: str,
    patient_id: str, accession: str, description: str, study_uid: str, when: dt.datetime,
    sop_class: str, rows: int, cols: int, bits: int, bits_stored: int, frames: int,
) -> Dataset:
    """Every attribute that is the same for all objects of one series."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if kind.geometry else "OTHER"]
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = (when + dt.timedelta(minutes=s)).strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "fastroute synth"
    ds.InstitutionName = "Loopback General Hospital"
    ds.ReferringPhysicianName = "REFERRER^DOC"
    ds.StudyDescription = description
    ds.SeriesDescription = f"Series {s}"
    ds.ProcedureCodeSequence = Sequence([_code("SYN-1", "99FASTROUTE", description)])
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = s
    ds.AcquisitionNumber = 1
    request = Dataset()
    request.RequestedProcedureID = f"RP{seed}"
    request.ScheduledProcedureStepID = f"SPS{seed}-{s}"
    request.ScheduledProtocolCodeSequence = Sequence([_code("P1", "99FASTROUTE", "Proto")])
    ds.RequestAttributesSequence = Sequence([request])
    if kind.geometry:
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = 1.25
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
    if modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
    elif modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
        ds.MagneticFieldStrength = 1.5
        ds.EchoTime, ds.RepetitionTime = 15, 500
    ds.SamplesPerPixel = kind.samples
    ds.PhotometricInterpretation = kind.photometric
    if kind.samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.private_block(0x0009, "FASTROUTE SYNTH", create=True)
    return ds


def _element_bytes(elem: DataElement, implicit: bool, little: bool,
                   charset: str | list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_data_element(fp, elem, charset)
    return fp.getvalue()


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr == b"OB":  # long form: 2 reserved bytes, 4-byte length
        return header + struct.pack("<HI", 0, len(value)) + value
    return header + struct.pack("<H", len(value)) + value


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """File Meta Information (always Explicit VR Little Endian), encoded by hand."""
    def ui(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\0" if len(raw) % 2 else raw

    version = b"FASTROUTE_SYNTH"
    version += b" " * (len(version) % 2)
    rest = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", ui(sop_class)),
        _meta_element(0x00020003, b"UI", ui(sop_uid)),
        _meta_element(0x00020010, b"UI", ui(transfer_syntax)),
        _meta_element(0x00020012, b"UI", ui(PYDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x00020013, b"SH", version),
    ])
    group_length = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(rest))
    return group_length + rest


def make_tiny(out_dir: str | os.PathLike[str], n: int = 10, **kwargs: object) -> list[Path]:
    """``n`` ~10 kB CT objects in one series: the unit of throughput benchmarks."""
    kwargs.setdefault("modality", "CT")
    return make_study(out_dir, n_instances=n, tiny=True, **kwargs)  # type: ignore[arg-type]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item
