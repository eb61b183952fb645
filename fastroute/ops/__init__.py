"""The management plane: operator actions, the HTTP API and dashboard, metrics, alerts.

It reads (and, for operator actions, writes) the spool, and never imports the data path
(the SCP/SCU shells, the scheduler, the group commit): ``tests/test_layers.py`` holds that.
"""
