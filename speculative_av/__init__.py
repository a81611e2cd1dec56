"""
Speculative cloud execution for ROS 2 camera perception.

Layers, imports pointing only downward:
``core`` (detections, deadlines, arbitration, statistics, image decoding limits; no ROS, no
gRPC) ->
``detectors``, ``cloud``, ``netem``, ``scenes`` (torchvision inference, gRPC client/server and
link security, network model and relay, generated driving scenes) ->
``ros`` (nodes, image conversion, message building) ->
``tools`` (replay, record, recordings, training, evaluation, demo).
"""
