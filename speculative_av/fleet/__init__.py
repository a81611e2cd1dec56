"""The fleet data engine's vehicle-side parts: triggers, snippets and their store, the recorder."""
