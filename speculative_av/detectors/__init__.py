"""Object detectors: an RGB array in, :class:`~speculative_av.core.detections.Detections` out."""
