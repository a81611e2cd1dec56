"""
`ros2 launch PACKAGE FILE [name:=value ...]` for machines without ros2cli.

It makes the same call as ros2launch's command: the launch file is found in the package's share
directory through the ament index, and the exit code is launch's.
"""
import sys

from ros2launch.api import get_share_file_path_from_package, launch_a_launch_file


def main(argv: list[str]) -> int:
    """Launch ``argv[0]``'s ``argv[1]`` with the launch arguments ``argv[2:]``."""
    package, file_name, *arguments = argv
    path = get_share_file_path_from_package(package_name=package, file_name=file_name)
    return launch_a_launch_file(launch_file_path=path, launch_file_arguments=arguments,
                                noninteractive=True)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
