"""Command line: argument parsing and printing only; the work lives in the modules it calls."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from fastroute import __version__
from fastroute.config import USER_ROLES, Config, load
from fastroute.errors import ConfigError, FastrouteError

STATES = {"pending": b"P", "failed": b"F", "unrouted": b"U", "quarantined": b"Q"}


class CliError(FastrouteError):
    """A command cannot run as given (missing file, no spool): one line, no traceback."""


def _config(args: argparse.Namespace) -> Config:
    return load(getattr(args, "config", None), getattr(args, "profile", None))


def _spool(cfg: Config):  # type: ignore[no-untyped-def]
    """Open an EXISTING spool: a command that reads it must never create an empty one.

    Without ``-c`` the embedded default names ./fastroute-spool, so running ``fastroute queue``
    in the wrong folder would otherwise report an empty, freshly made spool and exit 0.
    """
    if not (cfg.spool / "data.mdb").is_file():
        how = ("no -c given, so the embedded default's spool in the current folder was looked for"
               if cfg.source == "<embedded default>" else f"the 'spool:' of {cfg.source}")
        raise CliError(f"no spool at {cfg.spool.resolve()} ({how})",
                       hint="pass the router's configuration with -c FILE, or check its 'spool:' path")
    from fastroute.spool import open_spool
    return open_spool(cfg)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from fastroute.logsetup import set_process_title, setup_logging
    from fastroute.workers import Supervisor

    cfg = _config(args)
    setup_logging(cfg.log_level, cfg.log_format, process="supervisor")
    set_process_title("supervisor")
    for line in describe(cfg).splitlines():   # through logging: JSON too when log_format is json
        logging.getLogger("fastroute.banner").info("%s", line)
    return Supervisor(cfg, getattr(args, "config", None), getattr(args, "profile", None)).run()


def describe(cfg: Config) -> str:
    """The startup banner: where objects come in, where they are kept, where they go."""
    lines = [f"fastroute {__version__}: {cfg.source}",
             f"  listening as AE {cfg.ae_title} on {cfg.host}:{cfg.port} "
             f"({cfg.listeners} listener process{'es' if cfg.listeners > 1 else ''})",
             f"  spool: {cfg.spool.resolve()} (max {cfg.spool_max_bytes / 1024**3:.1f} GiB, "
             f"refuses new objects below {cfg.min_free_bytes / 1024**2:.0f} MiB free disk"
             + (f", {cfg.spool_prealloc / 1024**2:.0f} MiB written ahead" if cfg.spool_prealloc else "")
             + ")"]
    if cfg.tls is not None:
        lines.append(f"  DICOM TLS on {cfg.host}:{cfg.tls.port} (min TLS {cfg.tls.min_version}, client "
                     f"certificates {'required' if cfg.tls.require_client_cert else 'optional'})"
                     + ("" if cfg.port else "; no plain listener"))
    if cfg.allowed_calling_aes is not None:
        lines.append(f"  accepts calling AEs: {', '.join(cfg.allowed_calling_aes)}")
    for d in cfg.destinations.values():
        lines.append(f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port} "
                     f"({d.max_associations} association{'s' if d.max_associations > 1 else ''}"
                     + (f", TLS{'' if d.tls.cert else ' without a client certificate'}" if d.tls else "")
                     + ")")
    for r in cfg.rules:
        what = r.match if isinstance(r.match, str) else json.dumps(r.match) if r.match else "everything"
        lines.append(f"  rule {r.name}: {what} -> {', '.join(r.send_to) or 'nowhere'}{' (stop)' if r.stop else ''}")
    for d in cfg.destinations.values():
        if d.verify != "off":
            lines.append(f"  destination {d.name}: verification by C-FIND ({d.query_level} level) once a study "
                         f"settled ({d.verify_quiet:g}s quiet), {d.verify_attempts} re-send(s)")
        if d.commitment != "off":
            lines.append(f"  destination {d.name}: storage commitment ({d.commitment}, timeout "
                         f"{d.commitment_timeout:g}s)")
    sc = cfg.storage_commitment
    if sc.commit_when != "delivered" or cfg.peers:
        lines.append(f"  storage commitment for modalities: reported when {sc.commit_when} (timeout {sc.timeout:g}s)"
                     + "".join(f"; {p.ae_title}@{p.host}:{p.port}" for p in cfg.peers.values()))
    if cfg.http is not None:
        h = cfg.http
        lines.append(f"  dashboard, REST API and /metrics: {'https' if h.tls else 'http'}://{h.host}:{h.port}/")
        users = sorted(h.users.items())
        if users or h.token:
            lines.append("  users: " + ", ".join([f"{n} ({u.role})" for n, u in users]
                                                 + (["http.token (admin, deprecated)"] if h.token else [])))
        else:
            lines.append("  users: none: patient data and actions are served to no one (fastroute user add)")
        if h.trusted_proxies:
            lines.append(f"  user identity from proxies at: {', '.join(h.trusted_proxies)}")
    if cfg.default:
        lines.append(f"  objects no rule matches -> {', '.join(cfg.default)}")
    else:
        lines.append("  objects no rule matches -> kept in the spool as 'unrouted' (see `fastroute queue`)")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from fastroute.routing.rules import RuleSet
    rs = RuleSet.from_config(cfg)
    print(f"{args.config}: OK — {len(cfg.destinations)} destination(s), {len(cfg.rules)} rule(s), "
          f"rules read {len(rs.tags)} attribute(s)")
    print(describe(cfg))
    for warning in http_warnings(cfg):   # the management plane's exposure (issue 14)
        print(f"warning: {warning}")
    from fastroute.spool.space import space_warnings
    for warning in space_warnings(cfg.spool, cfg.min_free_bytes, cfg.spool_max_bytes):
        print(f"warning: {warning}")
    from fastroute.routing.commitment import commitment_warnings
    for warning in commitment_warnings(cfg):
        print(f"warning: {warning}")
    from fastroute.routing.verify import verify_warnings
    for warning in verify_warnings(cfg):
        print(f"warning: {warning}")
    return 1 if tls_findings(cfg) else 0


def http_warnings(cfg: Config) -> list[str]:
    """What ``fastroute check`` says about the management plane's exposure (issue 14)."""
    import ipaddress
    h = cfg.http
    if h is None:
        return []
    out = []
    if h.token:
        out.append("http.token is deprecated: it is one admin shared by everyone who has it; give each "
                   "person a user (fastroute user add NAME --role R) and remove it")
    try:
        loopback = ipaddress.ip_address(h.host).is_loopback
    except ValueError:
        loopback = h.host == "localhost"
    if h.tls is None and not loopback and not h.trusted_proxies:
        out.append(f"http.host {h.host} serves tokens and patient data over plain HTTP to the network: "
                   "set http.tls, or listen on 127.0.0.1 behind a TLS reverse proxy (http.trusted_proxies)")
    return out


def tls_findings(cfg: Config) -> int:
    """Print what ``fastroute check`` finds in the TLS files; the number of errors."""
    from fastroute.config import TlsPeerConfig
    from fastroute.dicom import tls
    findings = tls.check_listener(cfg.tls) if cfg.tls is not None else []
    if cfg.http is not None and cfg.http.tls is not None:   # HTTPS of the management plane
        from fastroute.ops.api import http_tls_as_listener
        findings += tls.check_listener(http_tls_as_listener(cfg.http.tls), prefix="http.tls")
    peers: list[tuple[str, str, object]] = [
        *(("destinations", name, d) for name, d in cfg.destinations.items()),
        *(("sources", name, s) for name, s in cfg.sources.items())]
    for section, name, peer in peers:    # a destination's or a source's own tls: (tls-scu)
        peer_tls = getattr(peer, "tls", None)
        if isinstance(peer_tls, TlsPeerConfig):
            findings += tls.check_peer(peer_tls, f"{section}.{name}.tls")
    for f in findings:
        print(f, file=sys.stderr if f.level == "error" else sys.stdout)
    return sum(f.level == "error" for f in findings)


IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def read_part10(path: str | Path) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) of a DICOM file, without decoding the dataset.

    A file without the Part 10 preamble and meta (a raw dataset, as some archives export) is
    read like the receive path's peek reads one: Explicit VR Little Endian when the first
    element carries a VR, else Implicit VR Little Endian. Anything else is a CliError.
    """
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{p}: is a directory, not a DICOM file",
                       hint="name the files, e.g. DIR/*.dcm")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CliError(f"{p}: cannot read: {exc.strerror}") from None
    if raw[128:132] == b"DICM":
        from pynetdicom.dsutils import split_dataset
        try:
            meta, offset = split_dataset(p)
        except Exception as exc:   # pydicom raises several kinds for a damaged meta group
            raise CliError(f"{p}: damaged DICOM file meta: {exc}") from None
        return str(meta.get("TransferSyntaxUID", IMPLICIT_LE)), raw[offset:]
    return _guess_raw_syntax(p, raw), raw


def _has_meta(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _guess_raw_syntax(p: Path, raw: bytes) -> str:
    from pydicom.valuerep import VR
    group = int.from_bytes(raw[0:2], "little") if len(raw) >= 8 else 0
    if not 0x0002 <= group <= 0x0028 or group % 2:    # datasets open with group 0008 (or so)
        raise CliError(f"{p}: not a DICOM file (no 'DICM' preamble, and it does not start like a "
                       "DICOM dataset)")
    try:
        VR(raw[4:6].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return IMPLICIT_LE
    return EXPLICIT_LE


def cmd_route_test(args: argparse.Namespace) -> int:
    from fastroute.dicom.attrs import read_attributes
    from fastroute.routing.intake import INDEX_KEYWORDS
    from fastroute.routing.rules import RuleSet

    cfg = _config(args)
    rs = RuleSet.from_config(cfg)
    context = {"calling_ae": args.calling_ae, "called_ae": args.called_ae or cfg.ae_title,
               "peer_ip": args.peer_ip}
    from fastroute.errors import PeekError

    for obj in args.objects:
        ts, data = read_part10(obj)
        try:
            attrs = read_attributes(data, ts, tuple(sorted(set(rs.tags) | set(INDEX_KEYWORDS))))
        except PeekError as exc:
            raise CliError(f"{obj}: cannot read the dataset: {exc}") from None
        raw = not _has_meta(obj)
        if raw and 0x00080018 not in attrs:
            raise CliError(f"{obj}: not a DICOM file (no 'DICM' preamble, and no SOP Instance UID "
                           "when read as a raw dataset)")
        print(f"{obj}: SOP Instance UID {attrs.get(0x00080018, '?')!s}, Modality {attrs.get(0x00080060, '-')!s}, "
              f"transfer syntax {ts}")
        if raw:
            print(f"  (no Part 10 file meta: read as a raw dataset, guessed {ts})")
        for trace in rs.explain(attrs, context):
            print(f"  {trace}")
        decision = rs.route(attrs, context)
        where = ", ".join(decision.destinations) or "nowhere: kept in the spool as unrouted"
        print(f"  => {where}{' (default route)' if decision.default_used else ''}")
        if args.diff and decision.destinations:
            from fastroute.ops.previews import preview_destinations, render
            print("  what each destination gets:")
            for line in render(preview_destinations(cfg, data, ts, decision.matched, context,
                                                    decision.destinations), indent="    "):
                print(line)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from fastroute.ops import actions as ops

    cfg = _config(args)
    spool = _spool(cfg)
    try:
        queues = ops.destination_status(cfg, spool)
        failed = ops.entries(cfg, spool, args.failed, "failed", limit=10000) if args.failed else None
        held = (ops.entries(cfg, spool, args.quarantined, "quarantined", limit=10000)
                if args.quarantined else None)
        if args.json:
            doc: dict[str, Any] = {"queues": queues, "usage": spool.usage(), "counters": spool.counters()}
            if failed is not None:
                doc["failed"] = failed
            if held is not None:
                doc["quarantined"] = held
            print(json.dumps(doc, indent=2))
            return 0
        print(f"{'destination':<20} {'state':<12} {'pending':>8} {'in flight':>9} {'failed':>7} "
              f"{'oldest':>7} {'delivered':>9} {'suppressed':>10} {'unknown':>7}")
        for q in queues:
            print(f"{q['name']:<20} {q['status']:<12} {q['pending']:>8} {q['in_flight']:>9} {q['failed']:>7} "
                  f"{_age(q['oldest_age']):>7} {q['delivered']:>9} {q['suppressed']:>10} {q['unknown_outcomes']:>7}")
            if q.get("committed") or q.get("commit_failed") or q.get("commit_waiting"):
                print(f"{'':<20} storage commitment: {q['committed']} committed, {q['commit_failed']} failed "
                      f"(re-sent), {q['commit_waiting']} waiting ({q['commit_overdue']} overdue)")
            dc = cfg.destinations.get(q["destination"])
            if dc is not None and dc.verify != "off":
                print(f"{'':<20} verification ({dc.verify}, quiet {dc.verify_quiet:g}s): {q['verified']} verified, "
                      f"{q['verify_waiting']} study(ies) waiting, {q['verify_failed_now']} verify-failed")
            if q.get("quarantined"):
                print(f"{'':<20} quarantined (not sent, kept): {q['quarantined']} "
                      f"(`fastroute queue --quarantined {q['name']}` lists them)")
            if q["last_error"] and q["status"] != "up":
                print(f"{'':<20} last error: {q['last_error']}")
        for e in failed or []:
            print(f"  oid={e['oid']} sop_instance_uid={e['sop_instance_uid']} study={e['study_instance_uid']} "
                  f"attempts={e['attempts']} status={e['status_text'] or '-'} error={e['error']}")
        for e in held or []:
            print(f"  quarantined oid={e['oid']} sop_instance_uid={e['sop_instance_uid']} "
                  f"study={e['study_instance_uid']} reason={e['error']}")
        return 0
    finally:
        spool.close()


def cmd_retry(args: argparse.Namespace) -> int:
    from fastroute.ops import actions as ops

    cfg = _config(args)
    spool = _spool(cfg)
    try:
        result = ops.retry(cfg, spool, destination=args.destination or "", study_instance_uid=args.study or "",
                           oids=args.oid or None, why=args.reason or "")
    finally:
        spool.close()
    where = ", ".join(f"{d}: {n}" for d, n in result["retried"].items()) or "nothing to retry"
    print(f"{result['count']} failed object(s) queued again ({where}); audited")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from fastroute.ops import actions as ops

    cfg = _config(args)
    spool = _spool(cfg)
    try:
        result = ops.purge(cfg, spool, destination=args.destination, states=args.state, reason=args.reason,
                           oids=args.oid or None, study_instance_uid=args.study or "")
    finally:
        spool.close()
    print(f"purged {result['count']} object reference(s) from {result['destination']} "
          f"({', '.join(args.state)}); audited")
    return 0


def cmd_send_now(args: argparse.Namespace) -> int:
    from fastroute.ops import actions as ops

    cfg = _config(args)
    spool = _spool(cfg)
    try:
        result = ops.send_now(cfg, spool, args.destination or "", all_destinations=args.all,
                              why=args.reason or "")
    finally:
        spool.close()
    for d in result["destinations"]:
        note = f" ({d['note']})" if "note" in d else ""
        print(f"{d['destination']}: backoff reset (was {d['was']}, {d['consecutive_failures']} failure(s) in a "
              f"row); {d['made_due']} object(s) waiting out a retry delay are due now{note}")
    print("sender(s) woken; audited")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from fastroute.dicom.scu import echo

    cfg = _config(args)
    ok, text = echo(cfg.destination(args.destination), cfg.ae_title)
    print(text)
    if ok:
        from fastroute.ops.actions import echo_succeeded
        if echo_succeeded(cfg, args.destination):
            print(f"{args.destination}: its sender was told to end any backoff and send now")
    return 0 if ok else 1


# The keys each level's answer shows (asked as return keys), besides those given.
QUERY_RETURN_KEYS = {
    "study": ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
    "series": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"),
    "image": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"),
}


def cmd_query(args: argparse.Namespace) -> int:
    """C-FIND a configured source (a findscu that knows the configuration)."""
    from fastroute.dicom.qr import Level, QueryFailed, QueryRetrieveClient, keyword_tag

    cfg = _config(args)
    src = cfg.source_named(args.source)
    keys: dict[str, str] = dict.fromkeys(QUERY_RETURN_KEYS[args.level], "")
    for item in args.keys:
        keyword, sep, value = item.partition("=")
        if not sep or keyword_tag(keyword) is None:
            raise CliError(f"{item!r} is not KEYWORD=VALUE with a DICOM keyword",
                           hint="e.g. StudyDate=20190101-20191231 PatientID=123 ModalitiesInStudy=CT")
        keys[keyword] = value
    rows: list[dict[str, str]] = []
    client = QueryRetrieveClient(src, cfg.ae_title)
    try:
        for ds in client.find(Level(args.level.upper()), keys):
            rows.append({k: _dicom_text(ds.get(k)) for k in keys})
    except QueryFailed as exc:
        raise CliError(str(exc)) from exc
    finally:
        client.close()
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return 0
    widths = {k: max([len(k), *(len(r[k]) for r in rows)]) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys).rstrip())
    for row in rows:
        print("  ".join(row[k].ljust(widths[k]) for k in keys).rstrip())
    print(f"{len(rows)} match(es) at {args.level.upper()} level from {src.ae_title}@{src.host}:{src.port}",
          file=sys.stderr)
    return 0


def _dicom_text(value: Any) -> str:
    """An answer's element as one line of text (several values joined by backslash)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def cmd_audit(args: argparse.Namespace) -> int:
    from fastroute.ops import actions as ops

    cfg = _config(args)
    spool = _spool(cfg)
    try:
        if args.verify:
            report = spool.audit_report()
            print(report.text)       # names the failed check; the head is for an off-box record
            return 0 if report.ok else 1
        since = ops.parse_time(args.since) if args.since else 0.0
        until = ops.parse_time(args.until, end=True) if args.until else float("inf")
        ops.audit_export(spool, sys.stdout, fmt=args.format, since=since, until=until,
                         study_instance_uid=args.study or "")
        return 0
    finally:
        spool.close()

# -- migrations (issue 13): thin wrappers over ops.migrations ------------------------------------

def _migration_spool(args: argparse.Namespace) -> tuple[Config, Any]:
    """The configuration and its EXISTING spool (the running router's: jobs live there)."""
    cfg = _config(args)
    return cfg, _spool(cfg)


def _print_job(doc: dict[str, Any]) -> None:
    eta = _age(doc.get("eta_s")) if doc.get("eta_s") is not None else "-"
    print(f"{doc['name']}: {doc['state']} ({doc.get('source', '?')} -> {', '.join(doc.get('destinations', ()))})")
    print(f"  studies: {doc['studies_total']} total, {doc['studies_verified']} verified, "
          f"{doc['studies_failed']} failed"
          + (f" ({', '.join(f'{k} {v}' for k, v in sorted(doc['studies_by_state'].items()) if v)})"
             if doc.get("studies_by_state") else ""))
    print(f"  instances: {doc['instances_expected']} expected, {doc['instances_received']} received, "
          f"{doc['instances_delivered']} delivered")
    print(f"  rate: {doc['rate']:.1f} instances/s over the last minute, ETA {eta}")
    limits = [f"at most {doc['rate_limit']}" if doc.get("rate_limit") else "no rate limit",
              f"windows {', '.join(doc['windows'])}" if doc.get("windows") else "any time",
              "verified at the destination" if doc.get("verify", True) else "not verified (--no-verify)"]
    print(f"  asked: {'; '.join(limits)}")
    if doc.get("error"):
        print(f"  error: {doc['error']}")
    for note in doc.get("inventory_notes") or ():
        print(f"  inventory note: {note}")


def cmd_migrate_start(args: argparse.Namespace) -> int:
    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        if args.studies and not os.access(args.studies, os.R_OK):
            raise CliError(f"studies file {args.studies}: missing or not readable")
        doc = mig.start(cfg, spool, source=args.source, destinations=args.to, name=args.name or "",
                        query=args.query or (), studies_file=args.studies, rate=args.rate,
                        windows=args.window or (), verify=args.verify, why=args.reason or "")
    finally:
        spool.close()
    print(doc["name"])
    print(f"migration {doc['name']} created ({doc['state']}); follow it with `fastroute migrate status "
          f"{doc['name']}`", file=sys.stderr)
    return 0


def cmd_migrate_list(args: argparse.Namespace) -> int:
    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        jobs = mig.list_jobs(spool)
    finally:
        spool.close()
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no migration jobs (start one with `fastroute migrate start`)")
        return 0
    print(f"{'job':<28} {'state':<17} {'studies':>8} {'verified':>8} {'failed':>7} {'received':>9} "
          f"{'expected':>9} {'rate/s':>7} {'eta':>6}")
    for j in jobs:
        print(f"{j['name']:<28} {j['state']:<17} {j['studies_total']:>8} {j['studies_verified']:>8} "
              f"{j['studies_failed']:>7} {j['instances_received']:>9} {j['instances_expected']:>9} "
              f"{j['rate']:>7.1f} {_age(j['eta_s']):>6}")
    return 0


def cmd_migrate_status(args: argparse.Namespace) -> int:
    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        doc = mig.status(spool, args.name)
        failed = mig.failures(spool, args.name, limit=10) if doc["studies_failed"] and not args.json else []
    finally:
        spool.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print_job(doc)
    if failed:
        more = f" (first {len(failed)}; `fastroute migrate report {args.name}` lists all)" \
            if len(failed) < doc["studies_failed"] else ""
        print(f"  failed studies{more}:")
        for f in failed:
            print(f"    {f['study_instance_uid']} (patient {f['patient_id'] or '-'}, accession "
                  f"{f['accession_number'] or '-'}): {f['reason'] or 'no reason recorded'}")
    return 0


def cmd_migrate_action(args: argparse.Namespace) -> int:
    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        doc = getattr(mig, args.action)(spool, args.name, why=args.reason or "")
    finally:
        spool.close()
    extra = f", {doc['retried']} stud{'y' if doc['retried'] == 1 else 'ies'} queued again" \
        if args.action == "retry" else ""
    print(f"{doc['name']}: {doc['state']}{extra}; audited")
    return 0


def cmd_migrate_report(args: argparse.Namespace) -> int:
    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        mig.write_report(spool, args.name, sys.stdout, args.format)
    finally:
        spool.close()
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    import time

    from fastroute.ops import migrations as mig

    cfg, spool = _migration_spool(args)
    try:
        doc = mig.retrieve(cfg, spool, source=args.source, study_instance_uid=args.study, destinations=args.to,
                           verify=args.verify, why=args.reason or "")
        name = doc["name"]
        print(name, flush=True)
        if not args.wait:
            return 0
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        seen = ""
        while not mig.is_final(doc["state"]):
            if deadline is not None and time.monotonic() > deadline:
                print(f"{name}: still {doc['state']} after {args.timeout:g}s (the job goes on; "
                      f"`fastroute migrate status {name}`)", file=sys.stderr)
                return 1
            time.sleep(1.0)   # polling the spool the router's migration process writes
            doc = mig.status(spool, name)
            line = (f"{name}: {doc['state']}, {doc['instances_received']}/{doc['instances_expected']} received, "
                    f"{doc['instances_delivered']} delivered" + (f"; {doc['error']}" if doc.get("error") else ""))
            if line != seen:
                print(line, file=sys.stderr)
                seen = line
        row = mig.study_outcome(spool, name, args.study)
    finally:
        spool.close()
    good = "verified" if args.verify else "delivered"
    state = row["state"] if row else "not found"
    why = f": {row['reason']}" if row and row.get("reason") else ""
    print(f"study {args.study}: {state}{why} (job {doc['state']})")
    return 0 if row is not None and state == good else 1


def cmd_user_add(args: argparse.Namespace) -> int:
    """A new user's token, printed once, and the entry (with only its hash) for http.users."""
    from fastroute.config import USER_NAME_RE
    from fastroute.ops.auth import hash_token, new_token

    if not USER_NAME_RE.fullmatch(args.name):
        print(f"error: {args.name!r} is not a user name (1-64 letters, digits and . _ @ -)", file=sys.stderr)
        return 2
    token = new_token()
    entry = {"role": args.role, "token_hash": hash_token(token)}
    if args.json:
        print(json.dumps({"user": args.name, **entry, "token": token}))
        return 0
    print(f"token for {args.name} (shown only now; fastroute stores only its hash):\n  {token}\n")
    print("add under http.users in the configuration, then reload:")
    print(f"  {args.name}: {{role: {args.role}, token_hash: \"{entry['token_hash']}\"}}")
    return 0


def cmd_user_hash_token(args: argparse.Namespace) -> int:
    """The hash of a token read from stdin (one line), or of a new one printed with it."""
    from fastroute.ops.auth import hash_token, new_token

    if args.new:
        token = new_token()
        print(f"token: {token}")
    else:
        if sys.stdin.isatty():
            import getpass
            token = getpass.getpass("token: ")
        else:
            token = sys.stdin.readline().strip()
        if len(token) < 16:
            print("error: a token of at least 16 characters is needed (or --new for a random one)",
                  file=sys.stderr)
            return 2
    print(f"token_hash: \"{hash_token(token)}\"")
    return 0


def _add_user_commands(sub: Any) -> None:
    up = sub.add_parser("user", help="HTTP plane users: add, hash-token",
                        description="users of the management plane (http.users): tokens are stored hashed")
    usub = up.add_subparsers(dest="user_command", required=True, metavar="COMMAND", title="commands")
    sp = usub.add_parser("add", help="a new token for NAME and its http.users entry (only the hash)")
    sp.add_argument("name", help="user name (shown in the audit trail)")
    sp.add_argument("--role", required=True, choices=USER_ROLES,
                    help="viewer: read (patient data included); operator: also act; admin: also configure")
    sp.add_argument("--json", action="store_true", help="one JSON object: user, role, token_hash, token")
    sp.set_defaults(func=cmd_user_add, config_required=False)
    sp = usub.add_parser("hash-token", help="hash a token read from stdin (e.g. the old http.token)")
    sp.add_argument("--new", action="store_true", help="make a new random token and print it with its hash")
    sp.set_defaults(func=cmd_user_hash_token, config_required=False)


def _governed_config(args: argparse.Namespace) -> tuple[Config, Any, str]:
    """The router's configuration, its open spool, and the file path (these commands need -c)."""
    if not getattr(args, "config", None):
        raise CliError("config commands need the router's configuration: -c FILE")
    cfg = _config(args)
    return cfg, _spool(cfg), str(args.config)


def cmd_config_propose(args: argparse.Namespace) -> int:
    from fastroute.ops import proposals as gov

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    cfg, spool, path = _governed_config(args)
    try:
        doc = gov.propose(cfg, spool, path, text, why=args.reason)
    finally:
        spool.close()
    p = doc["proposal"]
    print(f"proposal {p['id']} by {p['who']}: {', '.join(p['governed_changes']) or 'no governed section changed'}")
    print(f"waiting for a second admin: fastroute config approve {p['id']} --reason WHY; audited")
    return 0


def cmd_config_proposals(args: argparse.Namespace) -> int:
    from fastroute.ops import proposals as gov
    from fastroute.ops.actions import iso

    cfg, spool, _ = _governed_config(args)
    try:
        found = gov.proposals(spool, args.state or "")
    finally:
        spool.close()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no configuration proposals")
    for p in found:
        decided = f", {p['state']} by {p['decided_by']} ({p['decided_why']})" if p["decided_by"] else ""
        print(f"{p['id']:>4}  {p['state']:<9} {iso(p['created'])}  by {p['who']}: {p['why'] or '-'}{decided}")
        print(f"      changes: {', '.join(p['governed_changes']) or '(no governed section)'}")
        if args.diff:
            print("".join(f"      {line}" for line in p["diff"].splitlines(keepends=True)))
    return 0


def cmd_config_decide(args: argparse.Namespace) -> int:
    from fastroute.ops import proposals as gov

    cfg, spool, path = _governed_config(args)
    try:
        if args.decision == "approve":
            doc = gov.approve(cfg, spool, path, args.id, why=args.reason)
        else:
            doc = gov.reject(spool, args.id, why=args.reason)
    finally:
        spool.close()
    p = doc["proposal"]
    tail = f": {path} written, supervisor pid {doc['supervisor_pid']} signalled" if args.decision == "approve" else ""
    print(f"proposal {p['id']} (by {p['who']}) {p['state']} by {p['decided_by']}{tail}; audited")
    return 0


def _add_config_commands(sub: Any) -> None:
    """``config propose|proposals|approve|reject`` (governance two_person, issue 15); -c at
    either level. The CLI acts as the OS user (user@host), on the spool directly."""
    cp = sub.add_parser("config", help="configuration proposals: propose, proposals, approve, reject",
                        description="two-person governance of configuration changes (governance: two_person)")
    cp.add_argument("-c", "--config", dest="group_config", metavar="CONFIG", help="the router's YAML configuration")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="COMMAND", title="commands")

    def sub_cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp = csub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", help="the router's YAML configuration")
        sp.set_defaults(func=func, config_required=False)
        return sp

    sp = sub_cmd("propose", cmd_config_propose, "propose a new configuration file for a second admin to approve")
    sp.add_argument("--file", required=True, metavar="NEW.yaml", help="the proposed configuration")
    sp.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    sp = sub_cmd("proposals", cmd_config_proposals, "list configuration proposals, newest first")
    sp.add_argument("--state", choices=("pending", "approved", "applied", "rejected"))
    sp.add_argument("--diff", action="store_true", help="print each proposal's diff")
    sp.add_argument("--json", action="store_true")
    for decision, help in (("approve", "approve a proposal (not your own): written to the file, applied"),
                           ("reject", "reject (or withdraw) a proposal")):
        sp = sub_cmd(decision, cmd_config_decide, help)
        sp.add_argument("id", help="proposal id")
        sp.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        sp.set_defaults(decision=decision)


def _add_migration_commands(sub: Any, cmd: Any) -> None:
    """``migrate ...`` and ``retrieve``; ``-c`` is accepted at every level (its own dest at each,
    folded by parse_args)."""
    mp = sub.add_parser("migrate", help="PACS migration jobs: start, list, status, pause, resume, cancel, "
                        "retry, report", description="PACS migration jobs (see README 'Migrating a PACS')")
    mp.add_argument("-c", "--config", dest="group_config", metavar="CONFIG", help="YAML configuration file")
    msub = mp.add_subparsers(dest="migrate_command", required=True, metavar="COMMAND",
                             title="commands")

    def sub_cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp = msub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", help="YAML configuration file")
        sp.set_defaults(func=func, config_required=False)
        return sp

    sp = sub_cmd("start", cmd_migrate_start, "create a migration job in the router's spool; prints its name")
    sp.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="a key of 'sources:'")
    sp.add_argument("--to", action="append", required=True, metavar="DEST", help="destination (repeatable)")
    sp.add_argument("--name", help="job name (default: <source>-<yyyymmdd-hhmmss>)")
    sp.add_argument("--query", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="STUDY-level C-FIND keys, e.g. StudyDate=20190101-20191231 ModalitiesInStudy=CT")
    sp.add_argument("--studies", metavar="FILE", help="Study Instance UIDs or Accession Numbers, one a line "
                    "(or CSV with a header)")
    sp.add_argument("--rate", metavar="N/h|N/s", help="studies per hour or instances per second")
    sp.add_argument("--window", action="extend", nargs="+", metavar="HH:MM-HH:MM",
                    help="retrieve only inside these daily windows (local time; repeatable; "
                    "days first: sat,sun 00:00-24:00)")
    sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="verify each study by C-FIND at the destinations (default: yes)")
    sp.add_argument("--reason", default="", help="recorded in the audit trail")
    sp = sub_cmd("list", cmd_migrate_list, "every migration job and its progress")
    sp.add_argument("--json", action="store_true")
    sp = sub_cmd("status", cmd_migrate_status, "one job's state, counts, rate and ETA")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")
    for action, help in (("pause", "pause a job (audited)"), ("resume", "resume a paused job (audited)"),
                         ("cancel", "cancel a job; its studies keep their states (audited)"),
                         ("retry", "failed and incomplete studies again (audited)")):
        sp = sub_cmd(action, cmd_migrate_action, help)
        sp.add_argument("name")
        sp.add_argument("--reason", default="", help="recorded in the audit trail")
        sp.set_defaults(action=action)
    sp = sub_cmd("report", cmd_migrate_report, "one row per study (streamed)")
    sp.add_argument("name")
    sp.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default csv)")
    sp = cmd("retrieve", cmd_retrieve, "retrieve one study from a source into a destination (a one-study job)")
    sp.add_argument("source", help="a key of 'sources:'")
    sp.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    sp.add_argument("--to", action="append", required=True, metavar="DEST", help="destination (repeatable)")
    sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="verify by C-FIND at the destination (default: yes)")
    sp.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only when verified")
    sp.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up waiting after this")
    sp.add_argument("--reason", default="", help="recorded in the audit trail")



def cmd_bench(args: argparse.Namespace) -> int:
    """Thin wrapper: the capacity benchmark lives in bench/ of a source checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "cli.py").is_file():
        print("fastroute bench: the benchmark harness is not part of the installed package; from a "
              "source checkout run: python -m bench --help", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.cli import main as bench_main
    return bench_main(args.args)


def _version() -> str:
    try:
        from fastroute.native import implementations
        impl = ", ".join(f"{k}={v}" for k, v in implementations().items())
    except Exception as exc:   # pragma: no cover
        impl = f"unknown ({exc})"
    return f"fastroute {__version__} ({impl})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastroute", description="Durable, high-throughput DICOM router")
    p.add_argument("--version", action="version", version=_version())
    # Also accepted before the command (`fastroute -c FILE queue`); its own dest, because a
    # subcommand's default would overwrite the value otherwise.
    p.add_argument("-c", "--config", dest="global_config", metavar="CONFIG",
                   help="YAML configuration file, for any command")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, func: Any, help: str, config_required: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config",
                        help="YAML configuration file" + ("" if config_required else
                                                          " (default: the embedded default)"))
        sp.set_defaults(config_required=config_required)
        sp.set_defaults(func=func)
        return sp

    sp = cmd("serve", cmd_serve, "run the router (listeners and senders) until SIGTERM/SIGINT")
    sp.add_argument("--profile", help="tuning profile under the configuration: a shipped one by name "
                    "(2-cores, 4-cores, 8-cores, 16-cores) or a YAML file")
    sp = cmd("check", cmd_check, "validate a configuration file", config_required=True)
    sp.add_argument("--profile", help="tuning profile under the configuration: a shipped one by name "
                    "(2-cores, 4-cores, 8-cores, 16-cores) or a YAML file")
    sp = cmd("route-test", cmd_route_test, "show which rules match DICOM files and where they would go")
    sp.add_argument("objects", nargs="+", help="DICOM Part 10 files")
    sp.add_argument("--calling-ae", default="", help="calling AE title to assume")
    sp.add_argument("--called-ae", default="", help="called AE title to assume")
    sp.add_argument("--peer-ip", default="127.0.0.1", help="peer address to assume")
    sp.add_argument("--diff", action="store_true", help="per destination, each attribute its modify/deidentify "
                    "would change (old -> new), or unchanged / quarantined")
    sp = cmd("queue", cmd_queue, "per-destination queue depth, age and failures")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--failed", metavar="DEST", help="also list DEST's failed objects")
    sp.add_argument("--quarantined", metavar="DEST",
                    help="also list DEST's quarantined objects (held back by its de-identification)")
    sp = cmd("retry", cmd_retry, "queue failed objects again (a destination's, or a study's)")
    sp.add_argument("destination", nargs="?", default="", help="destination name (optional with --study)")
    sp.add_argument("--study", metavar="UID", help="only this Study Instance UID's failed objects")
    sp.add_argument("--oid", type=int, action="append", help="only this object id (repeatable)")
    sp.add_argument("--reason", default="", help="recorded in the audit trail")
    sp = cmd("purge", cmd_purge, "remove objects from a destination's queue (audited)")
    sp.add_argument("destination", help="destination name, or 'unrouted'")
    sp.add_argument("--state", action="append", choices=sorted(STATES), required=True,
                    help="which entries (repeatable)")
    sp.add_argument("--oid", type=int, action="append", help="only this object id (repeatable)")
    sp.add_argument("--study", metavar="UID", help="only this Study Instance UID's objects")
    sp.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    sp = cmd("send-now", cmd_send_now, "end a destination's backoff and send its queue now (audited)")
    sp.add_argument("destination", nargs="?", default="", help="destination name")
    sp.add_argument("--all", action="store_true", help="every configured destination")
    sp.add_argument("--reason", default="", help="recorded in the audit trail")
    sp = cmd("echo", cmd_echo, "C-ECHO a configured destination (on success its backoff ends)")
    sp.add_argument("destination")
    sp = cmd("query", cmd_query, "C-FIND a configured source: matches as a table or JSON")
    sp.add_argument("source", help="source name (under sources:)")
    sp.add_argument("keys", nargs="*", metavar="KEY=VALUE",
                    help="matching keys by DICOM keyword (StudyDate=20190101-20191231, PatientID=...)")
    sp.add_argument("--level", choices=("study", "series", "image"), default="study",
                    help="query level (default study); its usual return keys are added")
    sp.add_argument("--json", action="store_true", help="a JSON list of objects")
    sp = cmd("audit", cmd_audit, "export the audit trail (JSON lines or CSV) or verify its hash chain")
    sp.add_argument("--verify", action="store_true", help="check the hash chain")
    sp.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    sp.add_argument("--since", metavar="ISO", help="from this date/datetime (UTC when no zone)")
    sp.add_argument("--until", metavar="ISO", help="up to this datetime, or the end of this date")
    sp.add_argument("--study", metavar="UID", help="only events of this Study Instance UID")
    _add_migration_commands(sub, cmd)
    _add_user_commands(sub)
    _add_config_commands(sub)
    # Every argument goes to bench's own parser: no prefix character, so '--quick' stays a value.
    sp = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                        help="capacity benchmark (source checkout only; same as python -m bench)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bench)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, folding ``-c`` given before the command into the command's own ``config``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a positional list in one run: `route-test a.dcm -c F b.dcm` leaves b.dcm over
    if extra and getattr(args, "command", "") == "route-test" and not any(e.startswith("-") for e in extra):
        args.objects += extra
    elif extra and getattr(args, "command", "") == "query" and not any(e.startswith("-") for e in extra):
        args.keys += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for early in (getattr(args, "global_config", None), getattr(args, "group_config", None)):
        if early is not None and getattr(args, "config", None) not in (None, early):
            parser.error(f"-c given twice with different files ({early}, {args.config})")
        if early is not None:
            args.config = early
    if getattr(args, "config_required", False) and getattr(args, "config", None) is None:
        parser.error(f"the {args.command} command needs -c FILE")
    return args


def _quiet_broken_pipe() -> int:
    """The reader went away (``fastroute audit | head``): stop quietly, like any Unix filter.

    stdout is pointed at /dev/null so the interpreter's final flush cannot raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + 13   # what a shell reports for a filter ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()    # a broken pipe shows here at the latest, while it can be caught
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except ConfigError as exc:
        for error in getattr(exc, "errors", None) or (exc,):
            print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except FastrouteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

