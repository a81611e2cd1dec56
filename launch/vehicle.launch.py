"""Launch the speculative detector on a vehicle with config/vehicle.yaml.

ros2 launch speculative_av vehicle.launch.py camera_topic:=/camera/image_raw \
    deadline_ms:=120.0 cloud_endpoint:=datacenter=10.0.0.5:50051@10
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    """Return the node with the vehicle parameters, overridable by launch arguments."""
    config = os.path.join(get_package_share_directory('speculative_av'), 'config',
                          'vehicle.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('camera_topic', default_value='image',
                              description='Camera image topic the detector subscribes to.'),
        DeclareLaunchArgument('deadline_ms', default_value='150.0',
                              description='Per-frame deadline in milliseconds.'),
        DeclareLaunchArgument('cloud_endpoint', default_value='localhost:50051',
                              description='Cloud detector as [name=]host:port[@priority].'),
        DeclareLaunchArgument('params_file', default_value=config,
                              description='Parameter file of the node.'),
        Node(
            package='speculative_av',
            executable='speculative_detector',
            name='speculative_detector',
            output='screen',
            parameters=[
                LaunchConfiguration('params_file'),
                {'deadline_ms': LaunchConfiguration('deadline_ms'),
                 'cloud.endpoints': [LaunchConfiguration('cloud_endpoint')]},
            ],
            remappings=[('image', LaunchConfiguration('camera_topic'))],
        ),
    ])
