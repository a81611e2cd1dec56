"""Command-line tools: bag replay and recording, network relay, evaluation."""
