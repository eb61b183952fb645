"""Issue 15, item 2, "visible before it runs": ``route-test --diff`` prints, per destination, each
attribute its ``modify``/``deidentify`` would change (old -> new), or that it goes unchanged; the
API (``GET /api/objects/{oid}/diff``) offers the same for a stored object, to viewers and up,
audited as a read of patient data; the dashboard's object view shows it."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from aiohttp.test_utils import TestClient, TestServer

from fastroute.cli import read_part10
from fastroute.config import load
from fastroute.ops.api import make_app
from fastroute.ops.auth import hash_token
from fastroute.spool import Incoming, Spool

TOKENS = {"vera": "frt_viewer-token-0123456789abcdef"}
CONFIG = """\
spool: {spool}
spool_max_bytes: 256MiB
min_free_bytes: 0
destinations:
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: 1
    modify:
      - {{set: {{InstitutionName: "General Hospital"}}, when: 'InstitutionName missing'}}
      - {{set: {{InstitutionName: "General Hospital"}}}}
      - {{regex: {{PatientID: ['^(.*)$', 'GH-\\1']}}}}
      - {{delete: PatientWeight}}
  research:
    ae_title: AI
    host: 127.0.0.1
    port: 1
    deidentify: {{profile: basic, options: [retain-longitudinal-modified-dates], key: "env:PREVIEW_DEID_KEY"}}
  vna: {{ae_title: VNA, host: 127.0.0.1, port: 1}}
rules:
  - {{name: ct-all, match: {{Modality: CT}}, send_to: [pacs, research, vna]}}
http:
  host: 127.0.0.1
  users:
    vera: {{role: viewer, token_hash: "{vera}"}}
"""


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("PREVIEW_DEID_KEY", "p" * 32)
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(spool=tmp_path / "spool", vera=hash_token(TOKENS["vera"])))
    return path, Path(pydicom.data.get_testdata_file("CT_small.dcm"))   # type: ignore[no-untyped-call]


def test_route_test_diff_prints_old_and_new_per_destination(setup: tuple[Path, Path]) -> None:
    path, ct = setup
    ds = pydicom.dcmread(ct)
    res = subprocess.run([sys.executable, "-m", "fastroute", "route-test", "-c", str(path), str(ct), "--diff"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    lines = out.splitlines()
    assert "  what each destination gets:" in lines
    pacs = lines.index("    pacs: 3 attribute(s) changed by destination:pacs")
    assert (f"      (0008,0080) InstitutionName: {str(ds.InstitutionName)!r} -> 'General Hospital'"
            "  [set, destination:pacs]") in lines[pacs:]
    assert f"      (0010,0020) PatientID: {ds.PatientID!r} -> 'GH-{ds.PatientID}'  [regex, destination:pacs]" in lines
    assert f"      (0010,1030) PatientWeight: {str(ds.PatientWeight)!r} -> (removed)  [delete, destination:pacs]" in lines
    assert "    vna: unchanged (sent as received)" in lines
    research = next(line for line in lines if line.startswith("    research: "))
    assert "changed by deidentify:basic" in research
    assert any(line.startswith(f"      (0010,0010) PatientName: {str(ds.PatientName)!r} -> ") for line in lines)
    assert "PatientIdentityRemoved: (absent) -> 'YES'" in out
    # without the key, the research copy is reported as failing there; the others are shown
    env = {k: v for k, v in os.environ.items() if k != "PREVIEW_DEID_KEY"}
    nokey = subprocess.run([sys.executable, "-m", "fastroute", "route-test", "-c", str(path), str(ct), "--diff"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert nokey.returncode == 0, nokey.stderr
    assert "    research: fails, not sent: " in nokey.stdout and "PREVIEW_DEID_KEY is not set" in nokey.stdout
    assert "    pacs: 3 attribute(s) changed by destination:pacs" in nokey.stdout
    # without --diff: routing only, as before
    plain = subprocess.run([sys.executable, "-m", "fastroute", "route-test", "-c", str(path), str(ct)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "what each destination gets" not in plain.stdout


def test_api_object_diff_for_viewers_and_audited(setup: tuple[Path, Path]) -> None:
    path, ct = setup
    cfg = load(path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    ts, data = read_part10(ct)
    ds = pydicom.dcmread(ct)
    [put] = spool.put_many([Incoming(
        data=data, transfer_syntax=ts, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        destinations=("pacs", "research", "vna"), meta={
            "study_instance_uid": ds.StudyInstanceUID, "patient_id": ds.PatientID, "modality": "CT",
            "calling_ae": "CT1", "called_ae": "FASTROUTE", "peer": "10.0.0.5", "rules": ["ct-all"]})])
    oid = put.oid    # type: ignore[union-attr]
    vera = {"Authorization": f"Bearer {TOKENS['vera']}"}

    async def main() -> None:
        app = make_app(cfg, spool, str(path), monitor_interval=60)
        async with TestClient(TestServer(app)) as c:
            assert (await c.get(f"/api/objects/{oid}/diff")).status == 401     # patient data: a login
            resp = await c.get(f"/api/objects/{oid}/diff", headers=vera)
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert doc["sop_instance_uid"] == ds.SOPInstanceUID and doc["rules"] == ["ct-all"]
            by = {d["destination"]: d for d in doc["destinations"]}
            assert list(by) == ["pacs", "research", "vna"]
            assert by["vna"]["result"] == "unchanged" and by["vna"]["changes"] == []
            assert by["pacs"]["result"] == "changed" and by["pacs"]["by"] == ["destination:pacs"]
            pid = next(ch for ch in by["pacs"]["changes"] if ch["keyword"] == "PatientID")
            assert (pid["old"], pid["new"], pid["action"]) == (ds.PatientID, f"GH-{ds.PatientID}", "regex")
            assert by["research"]["result"] == "changed"
            assert by["research"]["sop_instance_uid"] not in ("", ds.SOPInstanceUID)   # a new UID
            resp = await c.get(f"/api/objects/{oid}/diff?destination=vna", headers=vera)
            assert [d["destination"] for d in (await resp.json())["destinations"]] == ["vna"]
            resp = await c.get(f"/api/objects/{oid}/diff?destination=nope", headers=vera)
            assert resp.status == 404 and "unknown destination" in (await resp.json())["error"]
            assert (await c.get(f"/api/objects/{oid + 1000}/diff", headers=vera)).status == 404
            # the dashboard's object view offers it
            js = await (await c.get("/static/app.js")).text()
            assert "/diff" in js and "What each destination gets" in js
    try:
        asyncio.run(main())
        reads = [e for e in spool.audit_events() if e["action"] == "http_read" and "/diff" in e.get("path", "")]
        assert reads and reads[0]["who"] == "vera"
        assert spool.read(oid) == data       # the preview changed nothing stored
    finally:
        spool.close()
