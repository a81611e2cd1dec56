"""The fleet data engine: vehicle-side and shared code of issue 10 (triggers, upload, ...)."""
