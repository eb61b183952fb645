"""Versioned profile data shipped with fastroute (package data, read with importlib.resources).

``ps3.15-table-e.1-1.csv``: PS3.15 Annex E Table E.1-1 with every column; its header comments
cite the source commit and licence. Read by :mod:`fastroute.content.table`.
"""
