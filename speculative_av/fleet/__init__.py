"""The fleet data engine: triggers, snippets, upload, model manifests and updates."""
