"""`fastroute migrate ...` and `fastroute retrieve` (issue 13) against a real spool.

Jobs are created through the CLI itself; where a test needs studies in a job (report, status
counts, retrieve --wait) it plays the migration runner's part through the job store's runner
API (spool.jobs), the same calls the migration process makes.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest

from fastroute.cli import main
from fastroute.config import Config, load
from fastroute.ops.migrations import jobs_of, write_report
from fastroute.spool import Spool
from fastroute.spool.audit import whoami
from fastroute.spool.jobs import REPORT_COLUMNS, InstanceRecord, StudyRecord, StudyState

CONFIG = """\
spool: {spool}
destinations:
  newpacs: {{ae_title: NEWPACS, host: 127.0.0.1, port: 1, query: true}}
  vna: {{ae_title: VNA, host: 127.0.0.1, port: 1}}
sources:
  oldpacs: {{ae_title: OLDPACS, host: 127.0.0.1, port: 1, retrieve: move}}
  archive2: {{ae_title: ARCH2, host: 127.0.0.1, port: 1, retrieve: get}}
"""
STATUS_KEYS = {"state", "studies_total", "studies_verified", "studies_failed", "instances_expected",
               "instances_received", "instances_delivered", "rate", "eta_s"}
STUDY = "1.2.826.0.1.3680043.10.77"


@pytest.fixture
def cfgfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(spool=tmp_path / "spool"))
    Spool(tmp_path / "spool", map_size=64 * 1024**2).close()   # the running router made it
    yield path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spool_of(cfgfile: Path) -> Spool:
    cfg: Config = load(cfgfile)
    return Spool(cfg.spool, map_size=cfg.spool_max_bytes)


def seed(cfgfile: Path, name: str) -> None:
    """Play the runner: three studies, one verified, one failed with its list, one pending."""
    spool = spool_of(cfgfile)
    try:
        jobs = jobs_of(spool)
        jobs.add_studies(name, [
            StudyRecord(seq=0, study_instance_uid=f"{STUDY}.1", patient_id="PAT1", accession_number="ACC1",
                        study_date="20190102", modalities="CT", source_instances=2),
            StudyRecord(seq=0, study_instance_uid=f"{STUDY}.2", patient_id="PAT2", accession_number="ACC2",
                        study_date="20190103", modalities="MR\\SR", source_instances=3),
            StudyRecord(seq=0, study_instance_uid=f"{STUDY}.3", patient_id="PAT3", accession_number="ACC,3"),
        ])
        jobs.inventory_done(name)
        jobs.set_instances(name, f"{STUDY}.1", [InstanceRecord(f"{STUDY}.1.{i}") for i in (1, 2)])
        jobs.mark_received(name, f"{STUDY}.1", {f"{STUDY}.1.1": 11, f"{STUDY}.1.2": 12})
        jobs.mark_delivered(name, f"{STUDY}.1", [f"{STUDY}.1.1", f"{STUDY}.1.2"])
        jobs.mark_found(name, f"{STUDY}.1", [f"{STUDY}.1.1", f"{STUDY}.1.2"])
        jobs.update_study(name, f"{STUDY}.1", state=StudyState.VERIFIED)
        jobs.set_instances(name, f"{STUDY}.2", [InstanceRecord(f"{STUDY}.2.{i}") for i in (1, 2, 3)])
        jobs.update_study(name, f"{STUDY}.2", state=StudyState.FAILED,
                          reason=f"missing at newpacs after 2 re-sends: {STUDY}.2.3")
    finally:
        spool.close()


def status_json(capsys: pytest.CaptureFixture[str], cfgfile: Path, name: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "migrate", "status", name, "--json", "-c", str(cfgfile))
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


# -- start, status, list, -c anywhere -----------------------------------------------------------

def test_start_prints_the_name_and_status_json_has_the_issue_keys(cfgfile: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    code, out, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                         "--name", "y2019", "--query", "StudyDate=20190101-20191231", "ModalitiesInStudy=CT",
                         "--query", "PatientID=", "--rate", "600/h", "--window", "19:00-07:00",
                         "--window", "sat,sun 00:00-24:00")
    assert code == 0, err
    assert out == "y2019\n" and "migrate status y2019" in err
    doc = status_json(capsys, cfgfile, "y2019")
    assert STATUS_KEYS <= set(doc), STATUS_KEYS - set(doc)
    assert doc["state"] == "inventory" and doc["studies_total"] == 0 and doc["eta_s"] is None
    assert doc["source"] == "oldpacs" and doc["destinations"] == ["newpacs"]
    assert doc["query"] == {"StudyDate": "20190101-20191231", "ModalitiesInStudy": "CT", "PatientID": ""}
    assert doc["rate_limit"] == "600/h" and doc["windows"] == ["19:00-07:00", "sat,sun 00:00-24:00"]
    assert doc["verify"] is True

    # -c before the command, between the group and the subcommand, and after: the same answer.
    for argv in (["-c", c, "migrate", "status", "y2019", "--json"],
                 ["migrate", "-c", c, "status", "y2019", "--json"],
                 ["migrate", "status", "y2019", "--json", "-c", c],
                 ["migrate", "status", "-c", c, "y2019", "--json"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and json.loads(out)["name"] == "y2019", (argv, err)
    for argv in (["-c", c, "migrate", "list"], ["migrate", "-c", c, "list"], ["migrate", "list", "-c", c]):
        code, out, err = cli(capsys, *argv)
        assert code == 0 and "y2019" in out and "inventory" in out, (argv, err)

    # The start itself, every -c position; without --name the job is <source>-<time>.
    code, out, _ = cli(capsys, "-c", c, "migrate", "start", "--from", "archive2", "--to", "newpacs")
    assert code == 0 and out.startswith("archive2-")
    code, out, _ = cli(capsys, "migrate", "-c", c, "start", "--from", "oldpacs", "--to", "vna", "--no-verify",
                       "--name", "second")
    assert code == 0 and out == "second\n"
    assert status_json(capsys, cfgfile, "second")["verify"] is False
    code, out, _ = cli(capsys, "migrate", "list", "--json", "-c", c)
    names = {j["name"] for j in json.loads(out)}
    assert {"y2019", "second"} < names and any(n.startswith("archive2-") for n in names) and len(names) == 3

    # audited, with the OS user
    spool = spool_of(cfgfile)
    try:
        ev = [e for e in spool.audit_events() if e["action"] == "migration_start"]
        assert [e["job"] for e in ev][0] == "y2019" and ev[0]["who"] == whoami()
        assert ev[0]["source"] == "oldpacs" and ev[0]["destinations"] == ["newpacs"]
    finally:
        spool.close()


def test_status_text_and_counts_follow_the_runner(cfgfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    assert cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs", "--name", "j")[0] == 0
    seed(cfgfile, "j")
    doc = status_json(capsys, cfgfile, "j")
    assert doc["state"] == "running"
    assert (doc["studies_total"], doc["studies_verified"], doc["studies_failed"]) == (3, 1, 1)
    assert (doc["instances_received"], doc["instances_delivered"]) == (2, 2)
    assert doc["instances_expected"] >= 5
    code, out, _ = cli(capsys, "migrate", "status", "j", "-c", c)
    assert code == 0 and out.startswith("j: running (oldpacs -> newpacs)")
    assert "3 total, 1 verified, 1 failed" in out and "2 received, 2 delivered" in out
    assert "asked: no rate limit; any time; verified at the destination" in out
    assert "error:" not in out
    spool = spool_of(cfgfile)
    try:
        spool.jobs.set_error("j", "OLDPACS answered 0xA801: register AE FASTROUTE as a move destination there")
        spool.jobs.save_inventory_progress("j", {"notes": ["StudyDate 20190101-20190101 still capped at 1 day"]})
    finally:
        spool.close()
    out = cli(capsys, "migrate", "status", "j", "-c", c)[1]
    assert "  error: OLDPACS answered 0xA801: register AE FASTROUTE as a move destination there\n" in out
    assert "  inventory note: StudyDate 20190101-20190101 still capped at 1 day\n" in out
    assert status_json(capsys, cfgfile, "j")["error"].startswith("OLDPACS answered 0xA801")
    assert f"  failed studies:\n    {STUDY}.2 (patient PAT2, accession ACC2): missing at newpacs after 2 re-sends: " \
        f"{STUDY}.2.3\n" in out


def test_windows_unquoted_and_several_after_one_option(cfgfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shell splits `--window sat,sun 00:00-24:00` typed unquoted: the days join their span."""
    code, out, err = cli(capsys, "migrate", "start", "-c", str(cfgfile), "--from", "oldpacs", "--to", "newpacs",
                         "--name", "w", "--window", "mon-fri", "19:00-07:00", "12:00-13:00",
                         "--window", "sat,sun", "00:00-24:00")
    assert code == 0, err
    assert status_json(capsys, cfgfile, "w")["windows"] == ["mon,tue,wed,thu,fri 19:00-07:00", "12:00-13:00",
                                                           "sat,sun 00:00-24:00"]
    code, out, _ = cli(capsys, "migrate", "list", "-c", str(cfgfile))
    assert code == 0 and out.splitlines()[1].startswith("w ")


# -- actions ------------------------------------------------------------------------------------

def test_pause_resume_cancel_retry_are_audited(cfgfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    assert cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs", "--name", "j")[0] == 0
    seed(cfgfile, "j")
    code, out, _ = cli(capsys, "migrate", "pause", "j", "-c", c, "--reason", "clinical peak")
    assert code == 0 and out == "j: paused; audited\n"
    assert status_json(capsys, cfgfile, "j")["state"] == "paused"
    code, _, err = cli(capsys, "migrate", "-c", c, "pause", "j")      # paused already: refused, said why
    assert code == 1 and "cannot pause migration j" in err
    code, out, _ = cli(capsys, "-c", c, "migrate", "resume", "j")
    assert code == 0 and out == "j: running; audited\n"
    code, out, _ = cli(capsys, "migrate", "retry", "j", "-c", c)
    assert code == 0 and "queued again" in out
    assert status_json(capsys, cfgfile, "j")["studies_failed"] == 0
    code, out, _ = cli(capsys, "migrate", "cancel", "j", "-c", c)
    assert code == 0 and out == "j: cancelled; audited\n"
    code, _, err = cli(capsys, "migrate", "resume", "j", "-c", c)
    assert code == 1 and "cannot resume" in err
    spool = spool_of(cfgfile)
    try:
        ev = [e for e in spool.audit_events() if e["action"].startswith("migration_")]
        assert [e["action"] for e in ev] == ["migration_start", "migration_pause", "migration_resume",
                                             "migration_retry", "migration_cancel"]
        assert all(e["job"] == "j" and e["who"] == whoami() for e in ev)
        assert ev[1]["why"] == "clinical peak" and ev[3]["count"] >= 1
    finally:
        spool.close()


# -- report -------------------------------------------------------------------------------------

def test_report_csv_and_json_one_row_per_study(cfgfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    assert cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs", "--name", "j")[0] == 0
    code, out, _ = cli(capsys, "migrate", "report", "j", "-c", c)
    assert code == 0 and out == ",".join(REPORT_COLUMNS) + "\n"          # header even when empty
    code, out, _ = cli(capsys, "migrate", "report", "j", "--format", "json", "-c", c)
    assert code == 0 and json.loads(out) == []
    seed(cfgfile, "j")
    code, out, _ = cli(capsys, "migrate", "report", "j", "-c", c)
    assert code == 0
    reader = csv.reader(io.StringIO(out))
    assert next(reader) == list(REPORT_COLUMNS)
    rows = [dict(zip(REPORT_COLUMNS, r)) for r in reader]
    assert [r["study_instance_uid"] for r in rows] == [f"{STUDY}.{i}" for i in (1, 2, 3)]   # inventory order
    one, two, three = rows
    assert (one["state"], one["source_instances"], one["received"], one["delivered"],
            one["found_at_destination"], one["reason"]) == ("verified", "2", "2", "2", "2", "")
    assert two["state"] == "failed" and two["reason"].endswith(f"{STUDY}.2.3") and two["modalities"] == "MR\\SR"
    assert three["accession_number"] == "ACC,3" and three["found_at_destination"] == ""   # quoted, unknown
    code, out, _ = cli(capsys, "-c", c, "migrate", "report", "--format", "json", "j")
    doc = json.loads(out)
    assert [list(r) for r in doc] == [list(REPORT_COLUMNS)] * 3
    assert doc[1]["state"] == "failed" and doc[2]["found_at_destination"] is None and doc[0]["received"] == 2


def test_report_is_streamed_not_built_in_memory(cfgfile: Path) -> None:
    """20,000 studies: the report's peak memory stays far below what the rows take as one text."""
    spool = spool_of(cfgfile)
    try:
        from fastroute.ops import migrations as mig
        cfg = load(cfgfile)
        mig.start(cfg, spool, source="oldpacs", destinations=["newpacs"], name="big")
        jobs = jobs_of(spool)
        n = 20_000
        for start in range(0, n, 2000):
            jobs.add_studies("big", [StudyRecord(seq=0, study_instance_uid=f"{STUDY}.{i}", patient_id=f"P{i}",
                                                 accession_number=f"A{i}", study_date="20200101", modalities="CT")
                                     for i in range(start, start + 2000)])

        class Sink(io.TextIOBase):
            def __init__(self) -> None:
                self.chars = 0
                self.lines = 0

            def write(self, s: str) -> int:
                self.chars += len(s)
                self.lines += s.count("\n")
                return len(s)

        sink = Sink()
        tracemalloc.start()
        try:
            write_report(spool, "big", sink, "csv")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sink.lines == n + 1
        assert peak < sink.chars / 2, (peak, sink.chars)   # held in memory: at least the whole text
    finally:
        spool.close()


# -- retrieve -----------------------------------------------------------------------------------

def test_retrieve_creates_a_one_study_job(cfgfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    code, out, err = cli(capsys, "retrieve", "oldpacs", "--study", STUDY, "--to", "newpacs", "-c", c)
    assert code == 0, err
    name = out.strip()
    assert name.startswith("retrieve-")
    code, out2, _ = cli(capsys, "-c", c, "retrieve", "oldpacs", "--study", STUDY, "--to", "newpacs")
    assert code == 0 and out2.strip() != name          # two in the same second get distinct names
    spool = spool_of(cfgfile)
    try:
        spec = jobs_of(spool).spec(name)
        assert spec.studies == (STUDY,) and spec.source == "oldpacs" and spec.destinations == ("newpacs",)
        assert spec.verify
    finally:
        spool.close()
    # --wait on a job no runner advances: gives up at --timeout, non-zero, and says the job goes on
    t0 = time.monotonic()
    code, out, err = cli(capsys, "retrieve", "oldpacs", "--study", STUDY, "--to", "newpacs", "--wait",
                         "--timeout", "1.5", "-c", c)
    assert code == 1 and "still inventory" in err and "the job goes on" in err
    assert time.monotonic() - t0 < 10


def test_retrieve_wait_exits_zero_only_when_verified(cfgfile: Path, tmp_path: Path) -> None:
    """A real `fastroute retrieve --wait` process while this test plays the runner: verified -> 0;
    a failed study -> 1 with its reason."""
    def run_wait(outcome: StudyState, reason: str = "", error: str = "") -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen([sys.executable, "-m", "fastroute", "retrieve", "oldpacs", "--study", STUDY,
                                 "--to", "newpacs", "--wait", "--timeout", "60", "-c", str(cfgfile)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name.startswith("retrieve-"), name
        seen = ""
        spool = spool_of(cfgfile)
        try:
            jobs = jobs_of(spool)
            if error:   # a job-level problem shows while it waits (read until it does: the waiter polls)
                jobs.set_error(name, error)
                assert proc.stderr is not None
                while error not in seen:
                    line = proc.stderr.readline()
                    assert line, f"the waiter ended without showing the error: {seen}"
                    seen += line
                jobs.set_error(name, "")
            jobs.add_studies(name, [StudyRecord(seq=0, study_instance_uid=STUDY, patient_id="PAT1")])
            jobs.inventory_done(name)
            jobs.set_instances(name, STUDY, [InstanceRecord(f"{STUDY}.1")])
            jobs.mark_received(name, STUDY, {f"{STUDY}.1": 1})
            jobs.mark_delivered(name, STUDY, [f"{STUDY}.1"])
            if outcome == StudyState.VERIFIED:
                jobs.mark_found(name, STUDY, [f"{STUDY}.1"])
            jobs.update_study(name, STUDY, state=outcome, reason=reason)
            jobs.finish(name)
        finally:
            spool.close()
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, name + "\n" + out, seen + err)

    ok = run_wait(StudyState.VERIFIED)
    assert ok.returncode == 0, ok.stderr
    assert f"study {STUDY}: verified (job done)" in ok.stdout
    bad = run_wait(StudyState.FAILED, "missing at newpacs: 1 instance",
                   error="OLDPACS answered 0xA702 (out of resources): backing off")
    assert "inventory, 0/0 received, 0 delivered; OLDPACS answered 0xA702 (out of resources): backing off" \
        in bad.stderr
    assert bad.returncode == 1
    assert f"study {STUDY}: failed: missing at newpacs: 1 instance (job done-with-errors)" in bad.stdout


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, rc, message", [
    (["--from", "nope", "--to", "newpacs"], 1, "unknown source 'nope' (configured: archive2, oldpacs)"),
    (["--from", "oldpacs", "--to", "nope"], 1, "unknown destination 'nope'"),
    (["--from", "oldpacs", "--to", "vna"], 1, "cannot verify at vna: no 'query: true'"),
    (["--from", "oldpacs", "--to", "newpacs", "--window", "25:00-07:00"], 1, "bad window '25:00-07:00'"),
    (["--from", "oldpacs", "--to", "newpacs", "--window", "nights"], 1, "bad window 'nights'"),
    (["--from", "oldpacs", "--to", "newpacs", "--window", "19:00-07:00", "sat,sun"], 1, "bad window 'sat,sun'"),
    (["--from", "oldpacs", "--to", "newpacs", "--rate", "fast"], 1, "bad rate 'fast'"),
    (["--from", "oldpacs", "--to", "newpacs", "--rate", "0/h"], 1, "bad rate '0/h'"),
    (["--from", "oldpacs", "--to", "newpacs", "--query", "StudyDat=2019"], 1, "did you mean StudyDate?"),
    (["--from", "oldpacs", "--to", "newpacs", "--query", "SeriesNumber=1"], 1, "not a STUDY-level key"),
    (["--from", "oldpacs", "--to", "newpacs", "--query", "StudyDate"], 1, "give KEY=VALUE"),
    (["--from", "oldpacs", "--to", "newpacs", "--studies", "/nonexistent/list.txt"], 1, "missing or not readable"),
    (["--from", "oldpacs", "--to", "newpacs", "--name", "bad name"], 1, "bad job name"),
    (["--to", "newpacs"], 2, "--from"),
])
def test_start_refuses_what_it_cannot_do(cfgfile: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                         rc: int, message: str) -> None:
    if rc == 2:
        with pytest.raises(SystemExit) as exc:
            main(["migrate", "start", "-c", str(cfgfile), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
        return
    code, out, err = cli(capsys, "migrate", "start", "-c", str(cfgfile), *argv)
    assert code == rc and message in err and out == "", (code, out, err)
    spool = spool_of(cfgfile)
    try:
        assert jobs_of(spool).names() == []             # nothing half-created
    finally:
        spool.close()


def test_unknown_job_and_missing_spool(cfgfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    assert cli(capsys, "migrate", "list", "-c", c)[1] == "no migration jobs (start one with `fastroute migrate start`)\n"
    assert cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs", "--name", "j")[0] == 0
    for verb in ("status", "pause", "resume", "cancel", "retry", "report"):
        code, out, err = cli(capsys, "migrate", verb, "nope", "-c", c)
        assert code == 1 and "unknown migration job 'nope' (jobs: j)" in err and out == "", verb
    with pytest.raises(SystemExit):
        main(["migrate", "report", "j", "--format", "xml", "-c", c])
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG.format(spool=tmp_path / "nospool"))
    code, _, err = cli(capsys, "migrate", "list", "-c", str(other))
    assert code == 1 and "no spool at" in err
    assert not (tmp_path / "nospool").exists()        # never creates an empty spool
    with pytest.raises(SystemExit):
        main(["-c", c, "migrate", "-c", str(other), "list"])          # two different -c: refused
    with pytest.raises(SystemExit):
        main(["migrate", "-c", c])
    assert "required: COMMAND" in capsys.readouterr().err


def test_studies_file_lines_and_csv(cfgfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfgfile)
    lines = tmp_path / "uids.txt"
    lines.write_text(f"# wanted\n{STUDY}.1\n\n{STUDY}.2\n{STUDY}.1\nACC42\n")
    code, out, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                         "--studies", str(lines), "--name", "listed")
    assert code == 0, err
    table = tmp_path / "export.csv"
    table.write_text("PatientID,AccessionNumber,StudyDate\nP1,ACC1,2019\nP2,\"ACC,2\",2019\n")
    both = tmp_path / "both.csv"          # a UID column wins over an accession column, whatever the order
    both.write_text(f"Accession Number,Study Instance UID\nACC1,{STUDY}.5\n")
    code, out, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                         "--studies", str(table), "--name", "fromcsv")
    assert code == 0, err
    code, out, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                         "--studies", str(both), "--name", "both")
    assert code == 0, err
    spool = spool_of(cfgfile)
    try:
        jobs = jobs_of(spool)
        assert jobs.spec("listed").studies == (f"{STUDY}.1", f"{STUDY}.2", "ACC42")
        assert jobs.spec("fromcsv").studies == ("ACC1", "ACC,2")
        assert jobs.spec("both").studies == (f"{STUDY}.5",)
    finally:
        spool.close()
    assert status_json(capsys, cfgfile, "listed")["studies_listed"] == 3
    headless = tmp_path / "headless.csv"
    headless.write_text("P1,ACC1\n")
    code, _, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                       "--studies", str(headless))
    assert code == 1 and "CSV without a header" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, _, err = cli(capsys, "migrate", "start", "-c", c, "--from", "oldpacs", "--to", "newpacs",
                       "--studies", str(empty))
    assert code == 1 and "lists no study" in err


def test_the_installed_command_runs_it(cfgfile: Path) -> None:
    """Once as a real process: the module entry point, exit codes and streams."""
    res = subprocess.run([sys.executable, "-m", "fastroute", "migrate", "start", "--from", "oldpacs", "--to",
                          "newpacs", "--name", "p", "-c", str(cfgfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "p\n", res.stderr
    res = subprocess.run([sys.executable, "-m", "fastroute", "migrate", "status", "nope", "-c", str(cfgfile)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("error: unknown migration job 'nope'")


def test_against_a_running_router_cli_and_api_see_the_same_job(tmp_path: Path) -> None:
    """`fastroute serve` running: a job started by the CLI is in its spool, the HTTP process lists
    it, pauses it for an API caller, and the CLI sees that (both audited with who did it)."""
    import urllib.request

    from peers import free_port, wait_until
    from router import Router, destination

    http_port = free_port()
    config = {"destinations": {"newpacs": destination(free_port(), "NEWPACS", query=True)},
              "sources": {"oldpacs": {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": free_port()}},
              "http": {"host": "127.0.0.1", "port": http_port, "token": "s3cret"}}
    with Router(tmp_path / "r", config) as router:
        res = router.cli("migrate", "start", "--from", "oldpacs", "--to", "newpacs", "--name", "live")
        assert res.stdout == "live\n"

        def api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": "Bearer s3cret", "X-Fastroute-Operator": "ops1",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        def listed() -> bool:
            try:
                return [j["name"] for j in api("GET", "/api/migrations")["migrations"]] == ["live"]
            except OSError:
                return False     # the HTTP process still starting
        wait_until(listed, 30, message=lambda: f"the API never listed the job:\n{router.log_tail()}")
        assert api("POST", "/api/migrations/live/pause", {"why": "clinical peak"})["state"] == "paused"
        doc = json.loads(router.cli("migrate", "status", "live", "--json").stdout)
        assert doc["state"] == "paused" and STATUS_KEYS <= set(doc)
        audit = [json.loads(line) for line in router.cli("audit").stdout.splitlines()]
        mine = [(e["action"], e["who"].split(" ")[0]) for e in audit if e["action"].startswith("migration_")]
        assert mine == [("migration_start", whoami()), ("migration_pause", "ops1")], mine
