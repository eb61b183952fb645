"""``python -m bench``: argument parsing, then workloads -> rounds (or soak) -> reports."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import itertools
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .procs import REPO, BenchError, stop_all

if TYPE_CHECKING:
    from .runs import Options, Progress
    from .workload import Workload

DEFAULT_MIX = "ct=70,mr=20,cr=5,us=5"
DEFAULTS = {"rounds": 3, "tiny": 500, "studies": 4, "mix": DEFAULT_MIX}
QUICK = {"rounds": 1, "tiny": 100, "studies": 1, "mix": "ct=100"}
SMOKE = "smoke run, not for sizing"


def int_list(text: str) -> list[int]:
    """``2`` or ``1,2,4``: one value or a sweep."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    from .workload import describe_shapes

    p = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Capacity-planning benchmark for fastroute.

            Sends synthetic studies with DCMTK dcmsend straight to a DCMTK receiver (the
            reference) and through a real `fastroute serve` to the same receiver (routed),
            alternating the two in every round, and reports instances/s, MB/s, studies/hour,
            latency percentiles (received -> delivered), CPU seconds and peak RSS per process,
            and the ratio routed/reference measured in the same run. Writes bench.json (every
            round's raw figures, the medians and the machine) and report.html (self-contained,
            inline SVG charts) to --out, and prints a table.

            It measures the INSTALLED fastroute (what `fastroute --version` reports; the report
            names the twin the router's listener says it runs), or this checkout built in place
            with --fastroute checkout. Generated data and spools go to a temporary folder that
            is removed afterwards (--work-dir DIR keeps them, and reuses the generated data).

            The default run takes about two minutes on a 2-core machine; --quick is a smoke
            run of well under a minute, marked "smoke run, not for sizing" in every output.
            --listeners and --associations take comma lists (1,2): every combination is
            measured and a scaling table printed. --soak MINUTES instead sends at a steady
            --rate and reports whether every process's memory stays bounded."""),
        epilog=textwrap.dedent(f"""\
            study shapes (uncompressed, Explicit VR Little Endian):
              {describe_shapes()}
            tiny objects: 64x64 16-bit CT, ~10 kB each.

            examples:
              python -m bench --quick
              python -m bench --senders 4 --associations 4 --mix ct=50,mr=30,cr=10,us=10 --studies 10
              python -m bench --fanout --orthanc --storescu
              python -m bench --profile tuning/8-cores.yaml --listeners 1,2 --associations 1,4
              python -m bench --soak 30 --rate 40
              python -m bench --spool --writers 1,2,4 --fastroute checkout

            see bench/README.md for how to read the output."""))
    w = p.add_argument_group("workload")
    w.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['rounds']} round, {QUICK['tiny']} tiny objects, "
                        f"{QUICK['studies']} CT study (options given explicitly still win)")
    w.add_argument("--tiny", type=int, metavar="N",
                   help=f"number of ~10 kB objects, measured as their own workload; 0: none (default {DEFAULTS['tiny']})")
    w.add_argument("--studies", type=int, metavar="N",
                   help=f"number of studies in the study mix; 0: none (default {DEFAULTS['studies']})")
    w.add_argument("--mix", metavar="SPEC",
                   help=f"study mix as modality=weight,... over ct, mr, cr, dx, us (default {DEFAULT_MIX}); "
                        "study counts are split by largest remainder")
    w.add_argument("--seed", type=int, default=1, help="seed of the synthetic pixel data (default 1)")
    w.add_argument("--migration", action="store_true",
                   help="instead: the PACS-migration workload. dcmqrscp (loaded with --studies of --mix) "
                        "-> fastroute migrate -> storescp, against movescu moving the same studies from "
                        "dcmqrscp straight to storescp in the same round (bench/migrate_bench.py)")
    w.add_argument("--spool", action="store_true",
                   help="instead: the spool micro-benchmark. W writer processes commit groups of values "
                        "(ct: 4 x 0.5 MB, tiny: 8 x 10 kB) for --duration seconds into one shared LMDB "
                        "environment vs one each, with write-lock wait/hold per writer (bench/spool_bench.py)")
    w.add_argument("--writers", type=int_list, default=[1, 2, 4], metavar="W[,W...]",
                   help="--spool: writer processes, a sweep (default 1,2,4)")
    w.add_argument("--duration", type=float, default=5.0, metavar="S",
                   help="--spool: seconds each run commits (default 5)")
    w.add_argument("--layouts", metavar="L[,L...]",
                   help="--spool: of shared, sharded, spool-shared, spool-sharded, spool-journal (default: "
                        "shared,sharded, and the spool-* ones this fastroute's Spool has)")
    r = p.add_argument_group("measurement")
    r.add_argument("--rounds", type=int, metavar="R",
                   help=f"rounds; each measures every path once, alternating their order (default {DEFAULTS['rounds']})")
    r.add_argument("--senders", type=int, default=1, metavar="N",
                   help="concurrent dcmsend processes, each sending its own share (default 1)")
    r.add_argument("--storescu", action="store_true",
                   help="also measure storescu -> storescp --fork as a second reference")
    r.add_argument("--fanout", action="store_true",
                   help="routed runs deliver to a second receiver too (every object twice)")
    r.add_argument("--orthanc", action="store_true",
                   help="routed runs also deliver to Orthanc (/usr/sbin/Orthanc), and dcmsend -> Orthanc "
                        "is measured as a reference")
    r.add_argument("--tls", action="store_true",
                   help="DICOM TLS (mutual) on every leg: storescu +tls -> storescp +tls --fork (reference) "
                        "vs storescu +tls -> fastroute's TLS listener -> its TLS sender -> the same storescp "
                        "(routed); certificates made with openssl in the work folder. Not with --fanout, "
                        "--orthanc, --storescu, --soak, --migration")
    r.add_argument("--deidentify", action="store_true",
                   help="PS3.15 de-identification on the destination (basic profile, the issue's options): "
                        "routed with it off vs on, alternating in the same run, on the CT workload (--mix, "
                        "default ct=100); instances/s, ratio, sender CPU ms/instance, and where the time goes "
                        "(parse / de-identify / re-encode). Measure this checkout: --fastroute checkout")
    r.add_argument("--receiver", choices=("auto", "dcmrecv", "storescp"), default="auto",
                   help="the DCMTK receiver: dcmrecv (one association at a time) or storescp --fork; "
                        "auto: dcmrecv unless the router opens more than one association per destination")
    r.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="give up on a measurement after S seconds (default 600)")
    r.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                   help="give up when nothing progressed for S seconds (default 60)")
    c = p.add_argument_group("router configuration")
    c.add_argument("--fastroute", choices=("installed", "checkout"), default="installed",
                   help="which fastroute the router runs: the installed one (default; the checkout is taken "
                        "off the path) or this checkout, after `setup.py build_ext --inplace`")
    c.add_argument("--listeners", type=int_list, metavar="K[,K...]",
                   help="router listener processes (config key listeners); several values: a sweep")
    c.add_argument("--associations", type=int_list, metavar="M[,M...]",
                   help="associations per destination (destination key max_associations); several values: a sweep")
    c.add_argument("--profile", type=Path, metavar="FILE",
                   help="YAML tuning profile merged into the generated router configuration "
                        "(destination keys under destinations: {'*': ..., dest1: ...})")
    s = p.add_argument_group("soak")
    s.add_argument("--soak", type=float, metavar="MINUTES",
                   help="instead of rounds, send continuously for MINUTES and sample memory")
    s.add_argument("--rate", type=int, default=20, metavar="N", help="soak: objects per second (default 20)")
    s.add_argument("--sample-every", type=float, default=5.0, metavar="S",
                   help="soak: seconds between memory samples (default 5)")
    s.add_argument("--soak-workload", choices=("tiny", "mix"), default="tiny",
                   help="soak: which objects to cycle through (default tiny)")
    o = p.add_argument_group("output")
    o.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="generated data (cached between runs) and scratch space (default: a temporary folder, "
                        "removed at the end)")
    o.add_argument("--receiver-dir", type=Path, metavar="DIR",
                   help="where the DCMTK receivers write (default: under --work-dir, i.e. the spool's "
                        "disk); another disk, or tmpfs, keeps their writes out of the spool's fsyncs, as "
                        "for a destination on another machine")
    o.add_argument("--out", type=Path, metavar="DIR",
                   help="where bench.json, report.html and table.txt go (default bench/results/<time>)")
    o.add_argument("--keep", action="store_true", help="keep spools, received files and logs of every run")
    o.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.deidentify:
        if args.tls or args.fanout or args.orthanc or args.storescu or args.soak is not None or args.migration \
                or args.spool:
            raise SystemExit("bench: --deidentify measures its own two routed paths; drop --tls, --fanout, "
                             "--orthanc, --storescu, --soak, --migration and --spool")
        if args.tiny is None:          # the CT studies; --tiny N: N tiny CT objects instead (a smoke test)
            args.tiny = 0
        args.mix = args.mix or "ct=100"
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.rounds < 1 or args.senders < 1 or args.tiny < 0 or args.studies < 0:
        raise SystemExit("bench: --rounds and --senders must be >= 1, --tiny and --studies >= 0")
    if args.tls and (args.fanout or args.orthanc or args.storescu or args.soak is not None or args.migration):
        raise SystemExit("bench: --tls measures its own two paths; drop --fanout, --orthanc, --storescu, "
                         "--soak and --migration")
    if args.soak is None and args.tiny == 0 and args.studies == 0:
        raise SystemExit("bench: nothing to send (--tiny 0 and --studies 0)")
    return vars(args)


def _profile(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"bench: cannot read --profile {path}: {exc}")
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SystemExit(f"bench: --profile {path}: expected a YAML mapping of configuration keys")
    return doc


def _associations(args: argparse.Namespace, profile: dict[str, Any]) -> int:
    if args.associations is not None:
        return max(args.associations)
    dests = profile.get("destinations") or {}
    values = [int((dests.get(k) or {}).get("max_associations", 1)) for k in ("*", "dest1", "dest2")]
    return max(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _settings(args)
    try:
        _choose_fastroute(args.fastroute)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process it started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all()


def _choose_fastroute(source: str) -> None:
    """Point the router (and the harness's own spool reads) at the fastroute to measure."""
    from . import peers

    peers.SOURCE = source
    if source == "checkout":
        res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO,
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BenchError(f"--fastroute checkout: building the native twin in place failed:\n"
                             f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
        sys.path.insert(0, str(REPO))
        return
    # `python -m bench` from the checkout puts it first on sys.path: take it off again, so
    # `import fastroute` here finds what the router will run (an editable install of this
    # checkout is still found: it is what is installed).
    sys.path[:] = [p for p in sys.path if not peers._is_repo(p)]
    try:
        import fastroute  # noqa: F401
    except ImportError:
        raise BenchError(f"fastroute is not installed for {sys.executable}: `pip install .` (or "
                         "`pip install -e .`) first, or measure this checkout with --fastroute checkout")


def _shown(values: list[int] | None) -> str:
    return ",".join(map(str, values)) if values else ""


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from .runs import Progress

    progress = Progress(quiet=args.quiet)
    profile = _profile(args.profile)
    started = dt.datetime.now().astimezone()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / stamp
    temp_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fastroute-bench-")) if temp_work else args.work_dir
    try:
        return _run_in(args, progress, profile, started, stamp, out, work)
    finally:
        if temp_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run_in(args: argparse.Namespace, progress: "Progress", profile: dict[str, Any], started: dt.datetime,
            stamp: str, out: Path, work: Path) -> int:
    from . import machine, workload
    from .runs import Options

    receiver = args.receiver
    if receiver == "auto":
        receiver = "storescp" if _associations(args, profile) > 1 else "dcmrecv"
    pki_dir = None
    if args.tls:                      # storescp +tls --fork: dcmrecv's TLS is not measured
        from .tlspki import make_pki
        receiver, pki_dir = "storescp", work / "pki"
        if not (pki_dir / "client.pem").exists():
            make_pki(pki_dir)
    opts = Options(senders=args.senders, listeners=(args.listeners or [None])[0],
                   associations=(args.associations or [None])[0],
                   receiver=receiver, fanout=args.fanout, orthanc=args.orthanc, storescu=args.storescu,
                   profile=profile, timeout=args.timeout, stall=args.stall_timeout, keep=args.keep,
                   run_dir=work / f"run-{stamp}",
                   receiver_dir=args.receiver_dir / f"run-{stamp}" if args.receiver_dir else None,
                   tls=pki_dir)
    log = progress.line if progress.tty else (lambda text: None)
    if args.migration:
        return _migration(args, progress, started, out, work, log)
    if args.deidentify:
        return _deidentify(args, progress, opts, started, out, work, log)
    if args.spool:
        return _spool(args, progress, started, out, work)

    mix = workload.parse_mix(args.mix) if args.studies or args.soak_workload == "mix" else {}
    workloads = []
    if args.soak is not None:
        wl = (workload.tiny_workload(work, max(args.tiny, args.rate * 30), args.seed, log)
              if args.soak_workload == "tiny" else workload.mix_workload(work, mix, max(args.studies, 1), args.seed, log))
        workloads.append(wl)
    else:
        if args.tiny:
            workloads.append(workload.tiny_workload(work, args.tiny, args.seed, log))
        if args.studies:
            workloads.append(workload.mix_workload(work, mix, args.studies, args.seed, log))
    biggest = max(w.bytes for w in workloads)
    copies = 2 + args.fanout + args.orthanc + args.storescu
    workload.check_disk(work, biggest * copies + 1024**3,
                        [f"{copies} copies of {biggest / 1e9:.2f} GB", "1 GB for the router's free-space guard"])

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["receiver_used"] = receiver
    settings["profile_content"] = profile
    settings["work_dir"] = str(work) + ("" if args.work_dir else " (temporary, removed)")
    settings["router"] = (f"listeners={_shown(args.listeners) or profile.get('listeners', 1)}, "
                          f"associations per destination={_shown(args.associations) or _associations(args, profile)}, "
                          f"profile={args.profile or 'none'}, receiver={receiver}, fastroute={args.fastroute}"
                          + (", DICOM TLS on every leg (mutual)" if args.tls else ""))
    progress.line(f"machine: probing; output to {out}")
    doc: dict[str, Any] = {
        "tool": "fastroute bench", "format": 2, "started": started.isoformat(timespec="seconds"),
        "note": SMOKE if args.quick else None,
        "machine": machine.describe(work, args.orthanc), "settings": settings,
        "workloads": {w.name: w.summary() for w in workloads},
    }
    try:
        return _measure(args, doc, opts, workloads, out, progress)
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(opts.run_dir, ignore_errors=True)
            if opts.receiver_dir is not None:
                shutil.rmtree(opts.receiver_dir, ignore_errors=True)


def _migration(args: argparse.Namespace, progress: "Progress", started: dt.datetime, out: Path,
               work: Path, log: Any) -> int:
    """``--migration``: the migration workload (bench/migrate_bench.py), its own report."""
    from . import machine, migrate_bench, report, workload

    studies: int = max(1, args.studies)     # _settings filled in the default
    wl = workload.mix_workload(work, workload.parse_mix(args.mix), studies, args.seed, log)
    workload.check_disk(work, wl.bytes * 4 + 1024**3,
                        ["4 copies of the studies (archive, spool, receiver, data)", "1 GB free-space guard"])
    doc: dict[str, Any] = {"tool": "fastroute bench --migration", "format": 2,
                           "started": started.isoformat(timespec="seconds"),
                           "note": SMOKE if args.quick else None,
                           "machine": machine.describe(work, False), "workloads": {wl.name: wl.summary()}}
    t0 = time.monotonic()
    try:
        doc["migration"] = migrate_bench.run_migration(wl, work / "migration", args.rounds, args.timeout,
                                                       args.stall_timeout, progress.line)
    finally:
        stop_all()
    progress.clear()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    text = (f"machine: {machine.one_line(doc['machine'])}\n" + migrate_bench.table(doc["migration"])
            + (f"\n({SMOKE})" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, out / "bench.json")
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'bench.json'} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def _deidentify(args: argparse.Namespace, progress: "Progress", opts: "Options", started: dt.datetime, out: Path,
                work: Path, log: Any) -> int:
    """``--deidentify``: routed with and without de-identification (bench/deid_bench.py)."""
    from . import deid_bench, report, workload

    wl = (workload.tiny_workload(work, args.tiny, args.seed, log) if args.tiny else
          workload.mix_workload(work, workload.parse_mix(args.mix), max(1, args.studies), args.seed, log))
    workload.check_disk(work, wl.bytes * 3 + 1024**3, ["3 copies of the studies", "1 GB free-space guard"])
    args.smoke = SMOKE if args.quick else None
    t0 = time.monotonic()
    try:
        doc, text = deid_bench.run(args, progress, opts, wl, work, log)
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(opts.run_dir, ignore_errors=True)
    progress.clear()
    doc["started"] = started.isoformat(timespec="seconds")
    doc["note"] = args.smoke
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, out / "bench.json")
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'bench.json'} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if doc["ok"] else 1


def _spool(args: argparse.Namespace, progress: "Progress", started: dt.datetime, out: Path,
           work: Path) -> int:
    """``--spool``: the spool micro-benchmark (bench/spool_bench.py), its own report."""
    from . import machine, report, spool_bench

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()] if args.layouts else None
    known = {*spool_bench.RAW_LAYOUTS, *spool_bench.SPOOL_LAYOUTS}
    if layouts and not set(layouts) <= known:
        raise SystemExit(f"bench: --layouts: unknown {sorted(set(layouts) - known)}; known: {sorted(known)}")
    doc: dict[str, Any] = {"tool": "fastroute bench --spool", "format": 2,
                           "started": started.isoformat(timespec="seconds"),
                           "note": "the machine may be shared: figures are noisy",
                           "machine": machine.describe(work, False)}
    t0 = time.monotonic()
    try:
        doc["spool"] = spool_bench.run_spool(work / "spool-bench", args.writers, args.duration, args.rounds,
                                             progress.line, layouts)
    except RuntimeError as exc:
        raise BenchError(str(exc))
    progress.clear()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = f"machine: {machine.one_line(doc['machine'])}\n" + spool_bench.table(doc["spool"])
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, out / "bench.json")
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'bench.json'} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def _measure(args: argparse.Namespace, doc: dict[str, Any], opts: "Options", workloads: list["Workload"],
             out: Path, progress: "Progress") -> int:
    from . import report
    from .runs import Bench, run_rounds

    t_start = time.monotonic()
    bench = Bench(opts, progress)
    if args.soak is not None:
        from .soak import soak

        doc["soak"] = soak(opts, workloads[0], args.soak, args.rate, args.sample_every, progress)
        doc["rounds"], doc["summary"] = [], {}
        ok = bool(doc["soak"].get("ok"))
    else:
        combos = list(itertools.product(args.listeners or [None], args.associations or [None]))
        records = []
        with bench:
            for listeners, associations in combos:
                bench.opts.listeners, bench.opts.associations = listeners, associations
                if len(combos) > 1:
                    progress.line(f"listeners={listeners or 'default'}, associations={associations or 'default'}")
                records += run_rounds(bench, workloads, args.rounds)
        doc["rounds"] = records
        doc["summary"] = report.summarise(records, {p: bench.describe(p) for p in bench.paths()},
                                          sweep=len(combos) > 1)
        doc["scaling"] = report.scaling(doc["summary"]) if len(combos) > 1 else None
        doc["headline"] = report.headline(doc)
        ok = all(r["ok"] for r in records)
    progress.clear()
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.mkdir(parents=True, exist_ok=True)
    text = report.table(doc)
    report.write_json(doc, out / "bench.json")
    (out / "table.txt").write_text(text + "\n")
    (out / "report.html").write_text(report.html_report(doc))
    print(text)
    print(f"\nwrote {out / 'bench.json'}, {out / 'report.html'} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

