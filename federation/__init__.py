"""medfed's shared core: config, tasks, model factory, DICOM, privacy, tracking."""

import os

__version__ = "0.1.0"

# Flower reports usage events over the internet from each of its processes (SuperLink,
# SuperNode, every ClientApp) unless told not to. Nothing leaves a site but what the
# federation sends, so medfed turns it off for itself and every process it starts (each
# report also cost a ClientApp a TLS setup: 15% of its time at 10 sites on 2 cores).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
