"""The gRPC cloud detection service: wire format, server and client."""
