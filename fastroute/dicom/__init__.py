"""DICOM networking: the upper layer (PDU framing, DIMSE), statuses, the SCP and SCU shells,
and the tag peek that reads the few attributes routing needs from encoded bytes.

Nothing here knows about the spool or the rules: the listener is handed its service handlers
(``fastroute.workers`` wires the C-STORE one to the spool), the sender calls the SCU.
"""
