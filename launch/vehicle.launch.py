"""
Launch the speculative detector on a vehicle: a parameter file plus typed overrides.

ros2 launch speculative_av vehicle.launch.py camera_topic:=/camera/image_raw deadline_ms:=120 \
    cloud_endpoints:=datacenter=10.0.0.5:50051@10,edge=10.0.0.6:50051@5

An override left empty (the default) keeps the value of params_file. The launch ends with the
node, with a non-zero exit code when the node failed: a vehicle without its detector must not
look healthy.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.events.process import ProcessExited
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

# Launch argument: (node parameter, its type, description). Typed because a launch argument is
# text, and the node rejects e.g. the INTEGER 120 for the DOUBLE deadline_ms.
SCALAR_OVERRIDES: dict[str, tuple[str, type, str]] = {
    'deadline_ms': ('deadline_ms', float, 'Per-frame deadline in milliseconds (120 or 120.0).'),
    'local_model': ('local.model', str, 'torchvision architecture of the on-board detector.'),
    'local_weights': ('local.weights', str,
                      'DEFAULT, a checkpoint path, or random (tests only).'),
    'local_device': ('local.device', str, 'cpu, cuda or cuda:N.'),
}
ENDPOINTS = 'cloud_endpoints'


def _end_launch(event: ProcessExited, context: LaunchContext) -> list[Shutdown]:
    """
    End the launch with the node; make a failed node fail the launch.

    launch.LaunchService returns 1 only when an exception reaches it: there is no other way to
    set `ros2 launch`'s exit code.
    """
    if event.returncode != 0:
        raise RuntimeError(f'{event.process_name} exited with code {event.returncode}')
    return [Shutdown(reason=f'{event.process_name} exited')]


def _detector(context: LaunchContext) -> list[Node]:
    """Return the node with params_file and only the overrides that were given."""
    if 'cloud_endpoint' in context.launch_configurations:
        raise ValueError(f'cloud_endpoint is now {ENDPOINTS}, a comma-separated list')
    overrides = {
        parameter: ParameterValue(LaunchConfiguration(argument), value_type=value_type)
        for argument, (parameter, value_type, _) in SCALAR_OVERRIDES.items()
        if LaunchConfiguration(argument).perform(context)}
    endpoints = LaunchConfiguration(ENDPOINTS).perform(context)
    if endpoints:  # a STRING_ARRAY parameter, also for a single endpoint
        overrides['cloud.endpoints'] = ParameterValue(
            [text.strip() for text in endpoints.split(',')], value_type=list[str])
    return [Node(
        package='speculative_av',
        executable='speculative_detector',
        name='speculative_detector',
        output='screen',
        parameters=[LaunchConfiguration('params_file'), overrides],
        remappings=[('image', LaunchConfiguration('camera_topic'))],
        on_exit=_end_launch,
    )]


def generate_launch_description() -> LaunchDescription:
    """Return the node with the vehicle parameters, overridable by launch arguments."""
    config = os.path.join(get_package_share_directory('speculative_av'), 'config',
                          'vehicle.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('params_file', default_value=config,
                              description='Parameter file of the node.'),
        DeclareLaunchArgument('camera_topic', default_value='image',
                              description='Camera image topic the detector subscribes to.'),
        *[DeclareLaunchArgument(argument, default_value='',
                                description=f'{text} Empty: as in params_file.')
          for argument, (_, _, text) in SCALAR_OVERRIDES.items()],
        DeclareLaunchArgument(
            ENDPOINTS, default_value='',
            description='Cloud detectors, comma-separated, each [name=]host:port[@priority]. '
                        'Empty: as in params_file.'),
        OpaqueFunction(function=_detector),
    ])
