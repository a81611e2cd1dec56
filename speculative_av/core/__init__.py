"""Speculation logic free of ROS and gRPC, testable with an injected clock."""
