"""The node's ``triggers.*`` parameters and their /diagnostics status (README: "Fleet data")."""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.node import Node
from speculative_av.fleet.recorder import TriggerRecorder
from speculative_av.ros.parameters import declare


def declare_trigger_parameters(node: Node) -> None:
    """Declare ``triggers.*`` (all read-only: they take effect at configure)."""
    def param(name: str, default: bool | int | float | str | list[str], description: str,
              value_range: tuple[float, float] | None = None) -> None:
        declare(node, f'triggers.{name}', default,  # type: ignore[type-var]
                description, read_only=True, value_range=value_range)

    param('enabled', False, 'Keep triggered frames as snippets (rosbag2 mcap files) on disk.')
    param('directory', '~/.cache/speculative_av/snippets',
          'Where snippet files and their index.jsonl are kept.')
    param('budget_mb', 1024.0, 'Disk budget of the snippets; beyond it the oldest are dropped '
          '(uploaded ones first).', value_range=(0.001, 1e9))
    param('disagreement', True, 'Trigger on an object one detector found and the other did not '
          '(cloud_only_object, local_only_object).')
    param('disagreement_classes', [''], "Classes the disagreement trigger looks at ([''] = all).")
    param('iou', 0.5, 'Boxes of one class overlapping this much are the same object.',
          value_range=(0.01, 1.0))
    param('min_score', 0.5, 'A detection counts for the triggers at or above this score.',
          value_range=(0.01, 1.0))
    param('low_confidence', 0.0, 'Trigger on a local detection scoring in [this, min_score) '
          '(0 = off).', value_range=(0.0, 1.0))
    param('classes_of_interest', [''], 'Trigger when either detector finds one of these classes '
          "([''] = none).")
    param('deadline_miss', False, 'Trigger when the cloud was asked and had no answer by the '
          'deadline.')
    param('max_per_minute', 6.0, 'Sustained rate of kept frames (a token bucket).',
          value_range=(0.001, 60_000.0))
    param('burst', 3, 'Frames that may be kept at once before the rate applies.',
          value_range=(1, 10_000))
    param('jpeg_quality', 90, 'JPEG quality of the kept image.', value_range=(1, 100))
    param('queue_size', 4, 'Triggered frames waiting for the writer thread; more are dropped '
          '(counted as queue_full).', value_range=(1, 1000))


def trigger_status(node_name: str, recorder: TriggerRecorder) -> DiagnosticStatus:
    """Return the triggers' counters: WARN after failed writes, ERROR if the writer died."""
    counters = recorder.snapshot()
    level = (DiagnosticStatus.ERROR if recorder.fatal else
             DiagnosticStatus.WARN if counters['write_errors'] else DiagnosticStatus.OK)
    message = recorder.fatal or (f"{counters['written']} snippets written, "
                                 f"{counters['bytes_on_disk'] / 1e6:.1f} MB on disk")
    return DiagnosticStatus(level=level, name=f'{node_name}: triggers', hardware_id=node_name,
                            message=message,
                            values=[KeyValue(key=k, value=str(v)) for k, v in counters.items()])
