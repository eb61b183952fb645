"""DICOM networking: fastroute's one engine, layered, and the tag peek routing reads from.

From the wire up:

* ``pdu``     PDU framing, PDV split/join and the command-set codec (bytes in, values out);
* ``dimse``   command fields, typed messages, PDV -> message assembly, response encoders,
              and the ``Handler`` / ``Reply`` / ``Pending`` types a service is written with;
* ``ul``      the upper-layer state machine (PS3.8), I/O-free, acceptor and requestor roles;
* ``acse``    negotiation and the implementation identity both roles announce;
* ``access``  who may associate; ``status`` status codes and their categories;
* ``scp``     the asyncio shell of the acceptor; ``scu`` the blocking-socket shell of the
              requestor;
* ``peek`` / ``attrs`` (and the Cython twin ``_peek``) read attributes from encoded datasets.

Where a new DIMSE service goes:

* one fastroute *answers* (C-FIND, C-MOVE, C-GET, N-ACTION, ...): a ``dimse.Handler``
  registered with ``scp.Listener`` for its request's ``CommandField`` (and its SOP class in
  ``sop_classes``); the shell dispatches to it and sends its ``Reply``. C-STORE is one such
  handler, ``fastroute.routing.intake.StoreService``;
* one fastroute *sends*: a method on ``scu.Connection`` beside ``send_raw`` (C-STORE) and
  ``echo``; requests the peer sends back on that association (C-GET's C-STOREs,
  N-EVENT-REPORT) go to handlers in ``Connection.handlers``.

Nothing here knows about the spool or the rules: the listener is handed its services
(``fastroute.workers`` wires the C-STORE one to the spool), the sender calls the SCU.
"""
