"""Where each object goes and how: rules, transfer-syntax planning and transcoding, and the
per-destination scheduler that sends through the SCU."""
