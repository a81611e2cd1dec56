"""
Emulated networks between vehicle and cloud, for the live relay and the offline evaluation.

``profiles`` holds the network model, the named profiles and traces (no ROS, no gRPC);
``delay_line`` schedules a relayed stream's chunks through that model; ``relay`` is the TCP relay
(``network_relay``) that puts it between the vehicle's node and the cloud server.
"""
