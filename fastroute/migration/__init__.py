"""PACS migration (issue 13): inventory a source archive by C-FIND, retrieve each study by
C-MOVE or C-GET into the router's own spool, and verify it at the destinations by C-FIND.

The jobs' state lives in the spool (:mod:`fastroute.spool.jobs`); this package is the process
that advances them (``fastroute serve`` starts it when ``sources:`` is configured).
"""
