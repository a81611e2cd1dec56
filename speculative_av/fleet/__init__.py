"""The fleet data engine: triggers, snippets, upload, model manifests (vehicle side and shared)."""
