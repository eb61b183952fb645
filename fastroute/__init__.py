"""fastroute: a durable, high-throughput store-and-forward DICOM router."""
from __future__ import annotations

import logging

__version__ = "0.1.0"

# The library owns the loggers, the application (cli.py) owns the handlers.
logging.getLogger("fastroute").addHandler(logging.NullHandler())
