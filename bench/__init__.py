"""fastroute's capacity-planning benchmark harness (``python -m bench``; see README.md).

Not part of the installed package and not a test suite: it starts real processes (DCMTK,
optionally Orthanc, and ``fastroute serve`` from this checkout) on 127.0.0.1 and measures
them. Modules: ``workload`` (synthetic studies from ``synth``, cached), ``procs`` (processes
and /proc), ``peers`` (receivers, Orthanc, the router), ``runs`` (timed transfers and
rounds), ``soak``, ``machine``, ``report``, ``cli``.
"""
