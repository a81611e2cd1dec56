"""The fleet data engine: triggers, snippets, upload, signed model releases and updates."""
