"""The real-peer infrastructure itself: if these fail, no integration test can be trusted."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import faultproxy
import peers
import pydicom
import pytest
from dicomcompare import DatasetMismatch, assert_same_dataset
from faultproxy import Fault
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

pytestmark = pytest.mark.peers

StoreSCPFactory = Callable[..., peers.StoreSCP]

DATA_STORE_FILES = [
    "693_J2KR.dcm",                     # JPEG 2000 lossless
    "MR2_J2KI.dcm",                     # JPEG 2000 lossy
    "emri_small_RLE.dcm",               # RLE, multi-frame
    "JPEG-LL.dcm",                      # JPEG lossless SV1
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "OBXXXX1A_expb.dcm",                # Explicit VR big endian
    "emri_small.dcm",                   # multi-frame, explicit little endian
    "SC_rgb.dcm",                       # colour
]
PYDICOM_FILES = [
    "image_dfl.dcm",        # deflated explicit VR little endian
    "test-SR.dcm",          # structured report: deep sequences, no pixels
    "MR_small_implicit.dcm",
]
CHARSET_FILES = ["chrH31.dcm", "chrX1.dcm"]  # ISO 2022 Japanese, UTF-8


def _source_files(pydicom_data_dir: Path) -> list[Path]:
    files = [pydicom_data_dir / name for name in DATA_STORE_FILES]
    files += [Path(get_testdata_file(name)) for name in PYDICOM_FILES]  # type: ignore[arg-type]
    files += [Path(get_charset_files(name)[0]) for name in CHARSET_FILES]
    return files


def _assert_received_as_sent(source: Path, received: Path) -> None:
    sent = pydicom.dcmread(source)
    got = pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, (
        f"{source.name}: sent as {sent.file_meta.TransferSyntaxUID.name}, "
        f"stored as {got.file_meta.TransferSyntaxUID.name}")
    assert_same_dataset(sent, got)


def test_echoscu_against_storescp(storescp: StoreSCPFactory) -> None:
    scp = storescp("DEST")
    result = peers.echoscu(scp.port, "DEST")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("index", range(len(DATA_STORE_FILES + PYDICOM_FILES + CHARSET_FILES)))
def test_storescu_keeps_the_files_own_transfer_syntax(
    storescp: StoreSCPFactory, pydicom_data_dir: Path, index: int
) -> None:
    source = _source_files(pydicom_data_dir)[index]
    scp = storescp("DEST")
    result = peers.storescu(scp.port, [source], "DEST", propose="original")
    assert result.returncode == 0, result.stderr
    [received] = scp.wait_for(1, timeout=10)
    _assert_received_as_sent(source, received)


def test_storescp_accepting_only_explicit_little_endian(
    storescp: StoreSCPFactory, pydicom_data_dir: Path
) -> None:
    """A generated acceptor profile: implicit VR is converted, JPEG 2000 is refused."""
    scp = storescp("DEST", accept=[ExplicitVRLittleEndian])
    implicit = Path(get_testdata_file("MR_small_implicit.dcm"))  # type: ignore[arg-type]
    assert peers.storescu(scp.port, [implicit], "DEST", propose="original").returncode == 0
    [received] = scp.wait_for(1, timeout=10)
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    j2k = peers.storescu(scp.port, [pydicom_data_dir / "693_J2KR.dcm"], "DEST",
                         propose="original")
    assert j2k.returncode != 0
    assert len(scp.files()) == 1


def test_storescp_refuse_option(storescp: StoreSCPFactory) -> None:
    scp = storescp("DEST", refuse=True)
    assert peers.echoscu(scp.port, "DEST").returncode != 0
    assert scp.running()


def test_storescp_abort_after_leaves_the_outcome_unknown(
    storescp: StoreSCPFactory, synth_study: Callable[..., list[Path]]
) -> None:
    """--abort-after: the sender gets no C-STORE response, whatever the SCP did."""
    [source] = synth_study(n_instances=1, tiny=True)
    scp = storescp("DEST", abort_after=True)
    result = peers.storescu(scp.port, [source], "DEST")
    assert result.returncode != 0
    assert scp.running()


def test_synthetic_study_round_trip(
    storescp: StoreSCPFactory, synth_study: Callable[..., list[Path]]
) -> None:
    sources = synth_study(modality="MR", n_series=2, n_instances=4, tiny=True, non_ascii=True)
    sources += synth_study(modality="US", n_instances=2, rows=32, cols=48, frames=3,
                           transfer_syntax=RLELossless)
    scp = storescp("DEST")
    result = peers.storescu(scp.port, sources, "DEST", propose="original")
    assert result.returncode == 0, result.stderr
    assert len(scp.wait_for(len(sources), timeout=20)) == len(sources)
    for source in sources:
        received = scp.file_for(source.stem)
        assert received is not None, f"{source.stem} not received"
        _assert_received_as_sent(source, received)


def test_untracked_storescp_and_dcmsend_dcmrecv(
    storescp: StoreSCPFactory, dcmrecv: Callable[..., peers.DcmRecv],
    synth_study: Callable[..., list[Path]], pydicom_data_dir: Path
) -> None:
    """The benchmark path: no exec hook per object, and dcmsend -> dcmrecv."""
    sources = synth_study(n_instances=5, tiny=True)
    fast = storescp("FAST", track=False)
    assert peers.storescu(fast.port, sources, "FAST").returncode == 0
    assert len(fast.wait_for(5, timeout=10)) == 5

    recv = dcmrecv("RECV")
    compressed = [pydicom_data_dir / "693_J2KR.dcm", pydicom_data_dir / "emri_small_RLE.dcm"]
    result = peers.dcmsend(recv.port, compressed, "RECV", decompress="never")
    assert result.returncode == 0, result.stderr
    recv.wait_for(2, timeout=10)
    for source in compressed:
        received = recv.file_for(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert received is not None
        _assert_received_as_sent(source, received)


def test_orthanc_receives_and_serves_the_instance(
    orthanc: peers.Orthanc, pydicom_data_dir: Path, dcmtk: dict[str, Path]
) -> None:
    assert peers.echoscu(orthanc.dicom_port, orthanc.ae_title).returncode == 0
    assert peers.echoscu(orthanc.dicom_port, "WRONG_AE").returncode != 0  # called AE checked
    source = pydicom_data_dir / "693_J2KR.dcm"
    result = peers.storescu(orthanc.dicom_port, [source], orthanc.ae_title, propose="original")
    assert result.returncode == 0, result.stderr
    uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    found = orthanc.wait_for_instance(uid)
    assert found["ID"] in orthanc.instances()
    assert orthanc.instance_transfer_syntax(found["ID"]) == "1.2.840.10008.1.2.4.90"
    stored = orthanc.workdir / "stored.dcm"
    stored.write_bytes(orthanc.get_instance_file(found["ID"]))
    _assert_received_as_sent(source, stored)
    assert orthanc.find_instance("1.2.3.4.5.6.7.8.9") is None


def test_fault_proxy_pass_through(
    storescp: StoreSCPFactory, fault_proxy: Callable[..., faultproxy.FaultProxy],
    synth_study: Callable[..., list[Path]]
) -> None:
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port)
    sources = synth_study(n_instances=3, tiny=True)
    result = peers.storescu(proxy.port, sources, "DEST")
    assert result.returncode == 0, result.stderr
    assert len(scp.wait_for(3, timeout=10)) == 3
    assert proxy.connections == 1 and proxy.cuts == 0
    assert proxy.bytes_up > sum(p.stat().st_size for p in sources) * 0.9


def test_fault_proxy_cut_refuse_delay_and_switch(
    storescp: StoreSCPFactory, fault_proxy: Callable[..., faultproxy.FaultProxy],
    synth_study: Callable[..., list[Path]]
) -> None:
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port, fault=Fault(cut_up_after=4096))
    [big] = synth_study(n_instances=1, rows=256, cols=256)
    assert peers.storescu(proxy.port, [big], "DEST").returncode != 0
    assert proxy.cuts == 1 and proxy.bytes_up == 4096
    assert scp.files() == []

    proxy.set_fault(Fault(cut_down_after=0))  # the request gets out, no answer comes back
    assert peers.echoscu(proxy.port, "DEST").returncode != 0
    assert proxy.cuts == 2

    proxy.set_fault(Fault(refuse=True))  # destination "down" while the port stays open
    assert peers.echoscu(proxy.port, "DEST").returncode != 0
    assert proxy.refused == 1 and peers.is_listening(proxy.port)

    proxy.set_fault(Fault(delay=0.1))
    started = time.monotonic()
    assert peers.echoscu(proxy.port, "DEST").returncode == 0
    assert time.monotonic() - started >= 0.2  # at least one chunk each way was delayed

    proxy.set_fault(Fault(blackhole=True))  # a hung peer: the SCU times out
    assert peers.echoscu(proxy.port, "DEST", extra_args=["-ta", "1"]).returncode != 0

    proxy.set_fault()  # healthy again
    assert peers.echoscu(proxy.port, "DEST").returncode == 0
    # echoscu has exited; the proxy notices the close on its own thread: poll, with a deadline.
    peers.wait_until(lambda: proxy.open_connections() == 0, timeout=10,
                     message=lambda: f"{proxy.open_connections()} proxy connection(s) still open")


def test_fault_proxy_outcome_unknown(
    storescp: StoreSCPFactory, fault_proxy: Callable[..., faultproxy.FaultProxy],
    synth_study: Callable[..., list[Path]]
) -> None:
    """The response PDU is dropped: the destination stored the object, the sender failed."""
    scp = storescp("DEST")
    proxy = fault_proxy(scp.port, fault=Fault(cut_down_at_pdu=faultproxy.P_DATA_TF))
    [source] = synth_study(n_instances=1, tiny=True)
    assert peers.storescu(proxy.port, [source], "DEST").returncode != 0
    [received] = scp.wait_for(1, timeout=10)
    assert received.name.endswith(f".{source.stem}.dcm")
    assert proxy.cuts == 1
    # storescp believes it answered; its reception hook runs after the file is written.
    peers.wait_until(lambda: scp.receptions() == [received.name], 10,
                     message=lambda: f"receptions: {scp.receptions()}")


def test_stop_leaves_no_process_and_no_port(storescp: StoreSCPFactory) -> None:
    scp = storescp("DEST", fork=True)
    assert peers.echoscu(scp.port, "DEST").returncode == 0
    pid = scp.pid
    assert pid is not None
    scp.stop()
    assert not scp.running() and not peers.is_listening(scp.port)
    assert scp.process is not None and scp.process not in peers.live_processes()
    scp.stop()  # idempotent


def test_assert_same_dataset_names_the_first_difference(
    synth_study: Callable[..., list[Path]]
) -> None:
    [path] = synth_study(n_instances=1, tiny=True)
    a, b = pydicom.dcmread(path), pydicom.dcmread(path)
    b.PatientName = str(a.PatientName) + " "  # trailing padding is tolerated
    assert_same_dataset(a, b)
    b.RequestAttributesSequence[0].ScheduledProtocolCodeSequence[0].CodeValue = "OTHER"
    with pytest.raises(DatasetMismatch) as err:
        assert_same_dataset(a, b)
    assert err.value.path == ("(0040,0275) RequestAttributesSequence[0] > "
                              "(0040,0008) ScheduledProtocolCodeSequence[0] > "
                              "(0008,0100) CodeValue")


def test_free_port_and_wait_until() -> None:
    ports = {peers.free_port() for _ in range(20)}
    assert len(ports) == 20
    assert peers.wait_until(lambda: 42, timeout=1) == 42
    with pytest.raises(TimeoutError, match="never"):
        peers.wait_until(lambda: False, timeout=0.1, message="never")
