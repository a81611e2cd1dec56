"""ROS 2 adapters: nodes, image conversion and message building."""
