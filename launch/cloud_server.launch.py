"""
Launch the gRPC cloud detection server (no ROS inside it; launch only supervises it).

ros2 launch speculative_av cloud_server.launch.py port:=50051 \
    model:=fasterrcnn_mobilenet_v3_large_fpn weights:=/models/cloud.pt device:=cuda \
    max_batch_size:=8 max_queue_delay_ms:=5 metrics_port:=9464 \
    tls_cert:=/etc/speculative_av/server.crt tls_key:=/etc/speculative_av/server.key \
    tokens:=/etc/speculative_av/tokens

The launch ends with the server, with a non-zero exit code when the server failed.
"""
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, Shutdown
from launch.events.process import ProcessExited
from launch.substitutions import LaunchConfiguration
from launch_ros.substitutions import ExecutableInPackage

ARGUMENTS = {
    'host': ('0.0.0.0', 'Address to listen on.'),
    'port': ('50051', 'Port to listen on.'),
    'model': ('fasterrcnn_mobilenet_v3_large_fpn', 'torchvision detection architecture.'),
    'weights': ('DEFAULT', 'DEFAULT, a checkpoint path, or random (tests only).'),
    'device': ('cpu', 'cpu, cuda or cuda:N.'),
    'concurrency': ('1', 'Inferences (batches) run at once.'),
    'scheduling': ('deadline', 'deadline (earliest deadline first, admission) or fifo.'),
    'max_batch_size': ('1', 'Requests inferred in one forward pass.'),
    'max_queue_delay_ms': ('0', 'Longest wait for a batch to fill (never past a deadline).'),
    'max_queue': ('16', 'Requests waiting for inference; beyond: RESOURCE_EXHAUSTED.'),
    'metrics_port': ('-1', 'Prometheus /metrics port: -1 none, 0 a free one (logged).'),
    'extra_latency_ms': ('0', 'Fixed delay before each reply (emulates a distant server).'),
    'insecure': ('false', 'true serves plaintext (logs a warning); else give the TLS files.'),
    'tls_cert': ('', 'PEM server certificate (TLS).'),
    'tls_key': ('', 'PEM private key of tls_cert.'),
    'tls_client_ca': ('', 'PEM CA that client certificates must chain to (mutual TLS).'),
    'tokens': ('', "File of per-vehicle bearer tokens ('vehicle_id token' lines)."),
    'max_calls_per_client': ('0', 'Concurrent Detect calls one client may hold (0 = no limit).'),
}


def _end_launch(event: ProcessExited, context: LaunchContext) -> list[Shutdown]:
    """
    End the launch with the server; make a failed server fail the launch.

    launch.LaunchService returns 1 only when an exception reaches it: there is no other way to
    set `ros2 launch`'s exit code.
    """
    if event.returncode != 0:
        raise RuntimeError(f'{event.process_name} exited with code {event.returncode}')
    return [Shutdown(reason=f'{event.process_name} exited')]


def generate_launch_description() -> LaunchDescription:
    """Return the server process with every option as a launch argument."""
    arguments = [DeclareLaunchArgument(name, default_value=default, description=text)
                 for name, (default, text) in ARGUMENTS.items()]
    command = [ExecutableInPackage('cloud_server', 'speculative_av')]
    for name in ARGUMENTS:
        command += [f'--{name.replace("_", "-")}', LaunchConfiguration(name)]
    # A plain process, not a launch_ros Node: the server takes no --ros-args.
    return LaunchDescription([*arguments, ExecuteProcess(
        cmd=command, output='screen', on_exit=_end_launch)])
