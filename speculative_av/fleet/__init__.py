"""The fleet data engine: vehicle-side and shared code (triggers, upload, shadow, updates)."""
