"""Governed content changes (issue 15): what a destination's sender changes in an object.

``changes``    the record of one change (:class:`Change`) and of a changed object (:class:`Applied`);
``modify``     the ``modify:`` actions (set, delete, copy, regex, lookup, each with ``when:``);
``deidentify`` the PS3.15 Annex E Basic Application Level Confidentiality Profile and its options;
``plan``       per destination, which of the above an object gets, applied once in the sender.

Nothing here runs in a listener: the spool keeps the bytes as received, and a destination with
no ``modify``/``deidentify`` (and no rule with ``modify`` sending to it) gets them zero-copy.
"""
