"""Speculative cloud execution for ROS 2 camera perception.

Layers, imports pointing only downward:
``core`` (detections, deadlines, arbitration, statistics; no ROS, no gRPC) ->
``detectors`` and ``cloud`` (torchvision inference, gRPC client/server) ->
``ros`` (nodes, image conversion, message building) -> ``tools`` (replay, relay, evaluation).
"""
