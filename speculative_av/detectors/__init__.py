"""Object detectors that turn an RGB array into :class:`~speculative_av.core.detections.Detections`."""
