"""medfed's shared core: config, tasks, model factory, DICOM, privacy, tracking."""

__version__ = "0.1.0"
