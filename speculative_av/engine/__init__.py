"""The per-frame speculative pipeline without ROS: node, evaluation and Python API run it."""
