"""
The node's fleet-data parameter groups: ``triggers.*``, ``upload.*`` and ``shadow.*``.

Each group is declared, turned into its running part at configure (the trigger recorder, the
snippet uploader, the shadow runner) and reported on /diagnostics here, so the node only holds
them (README: "The fleet data engine").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
import grpc
import numpy as np
from rclpy.node import Node
from speculative_av.cloud.dispatch import CloudDispatcher
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.core.detections import label_mapping
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.engine.shadow import ShadowRunner, ShadowSettings
from speculative_av.fleet.recorder import TriggerRecorder
from speculative_av.fleet.snippets import SnippetEntry, SnippetStore
from speculative_av.fleet.triggers import TriggerSettings
from speculative_av.fleet.uploader import SnippetUploader, UploaderSettings
from speculative_av.ros.parameters import declare, declare_link_security, link_security


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


def trigger_recorder(node: Node, categories: list[str]) -> TriggerRecorder | None:
    """Return the started recorder of triggered frames the triggers.* parameters ask for."""
    def value(name: str) -> Any:
        return node.get_parameter(f'triggers.{name}').value

    if not value('enabled'):
        return None
    settings = TriggerSettings(
        disagreement=value('disagreement'),
        disagreement_classes=tuple(c for c in value('disagreement_classes') if c),
        iou=value('iou'), min_score=value('min_score'), low_confidence=value('low_confidence'),
        classes_of_interest=tuple(c for c in value('classes_of_interest') if c),
        deadline_miss=value('deadline_miss'), max_per_minute=value('max_per_minute'),
        burst=value('burst'))
    store = SnippetStore(Path(value('directory')).expanduser(),
                         round(value('budget_mb') * 1024 * 1024))
    recorder = TriggerRecorder(settings, store, categories, queue_size=value('queue_size'),
                               jpeg_quality=value('jpeg_quality'), logger=node.get_logger())
    recorder.start()
    node.get_logger().info(f'triggers on: snippets in {store.directory} '
                           f'({store.bytes_on_disk / 1e6:.1f} of '
                           f'{store.budget_bytes / 1e6:.0f} MB used)')
    return recorder


def declare_upload_parameters(node: Node) -> None:
    """Declare ``upload.*``: triggered snippets to the collector (read-only)."""
    declare(node, 'upload.enabled', False,
            'Upload triggered snippets (needs triggers.enabled) to the snippet collector, at '
            'the lowest priority: paused while detection calls are in flight.', read_only=True)
    declare(node, 'upload.target', 'localhost:50061',
            "The collector as 'host:port' (snippet_collector).", read_only=True)
    declare(node, 'upload.chunk_kb', 32,
            'Chunk size; at most one chunk is sent after detection calls start.',
            read_only=True, value_range=(1, 1024))
    declare_link_security(node, 'upload', 'collector')


def upload_security(node: Node) -> ChannelSecurity | None:
    """Return the collector link's security, None when upload is off (SecurityError)."""
    return link_security(node, 'upload') if node.get_parameter('upload.enabled').value else None


def snippet_uploader(node: Node, security: ChannelSecurity, store: SnippetStore,
                     dispatcher: CloudDispatcher | None
                     ) -> tuple[SnippetUploader[SnippetEntry], grpc.Channel]:
    """Start uploading ``store`` over a new channel; paused while ``dispatcher`` has calls."""
    target = node.get_parameter('upload.target').value
    channel = security.channel(target, [])
    uploader = SnippetUploader(
        store, channel,
        link_busy=(lambda: dispatcher.in_flight() > 0) if dispatcher else (lambda: False),
        settings=UploaderSettings(chunk_bytes=node.get_parameter('upload.chunk_kb').value << 10))
    if dispatcher is not None:
        dispatcher.add_idle_listener(uploader.link_changed)
    uploader.start()
    node.get_logger().info(f'uploading snippets to {target}' + (
        ' in PLAINTEXT (upload.insecure)' if security.credentials is None else ''))
    return uploader, channel


def upload_status(node_name: str, uploader: SnippetUploader[Any]) -> DiagnosticStatus:
    """Return the uploader's counters for /diagnostics."""
    stats = vars(uploader.stats())
    return DiagnosticStatus(
        level=DiagnosticStatus.OK, name=f'{node_name}: upload', hardware_id=node_name,
        message=f"{stats['uploaded']} uploaded, {stats['duplicates']} duplicate(s)",
        values=[KeyValue(key=k, value=f'{v:.3f}' if isinstance(v, float) else str(v))
                for k, v in stats.items()])


def declare_shadow_parameters(node: Node) -> None:
    """Declare ``shadow.*``: a candidate model compared beside the deployed one (read-only)."""
    declare(node, 'shadow.enabled', False,
            'Run a candidate local model in shadow mode: on some frames, beside the deployed '
            'one, never touching the fused output; its agreement with the deployed and the '
            'cloud results per estimated day/dusk/night goes on /diagnostics.', read_only=True)
    declare(node, 'shadow.model', '',
            "torchvision architecture of the candidate ('' = local.model).", read_only=True)
    declare(node, 'shadow.weights', '',
            "The candidate's weights: a checkpoint path or 'DEFAULT' ('' = local.weights; "
            "'random' for tests only).", read_only=True)
    declare(node, 'shadow.every_nth', 4,
            'Offer the candidate every Nth frame with a local result (1 = every frame).',
            read_only=True, value_range=(1, 1_000_000))
    declare(node, 'shadow.cpu_share', 0.25,
            "Most of one core's wall time the candidate may use (1.0 = no limit); frames beyond "
            'it are skipped, counted as skipped_budget.', read_only=True, value_range=(0.01, 1.0))
    declare(node, 'shadow.iou', 0.5,
            'Boxes of one class overlapping this much are the same object when comparing.',
            read_only=True, value_range=(0.01, 1.0))
    declare(node, 'shadow.min_score', 0.5,
            'Detections scoring below this are left out of the comparison.', read_only=True,
            value_range=(0.0, 1.0))


def shadow_runner(node: Node, deployed: TorchvisionDetector) -> ShadowRunner | None:
    """Load and warm up the candidate when shadow mode is on (ValueError/OSError if not)."""
    def value(name: str) -> Any:
        return node.get_parameter(name).value

    if not value('shadow.enabled'):
        return None
    candidate = TorchvisionDetector(
        value('shadow.model') or value('local.model'),
        value('shadow.weights') or value('local.weights'), value('local.device'),
        value('local.score_threshold'))
    candidate.detect(np.zeros((480, 640, 3), np.uint8))
    settings = ShadowSettings(every_nth=value('shadow.every_nth'),
                              cpu_share=value('shadow.cpu_share'), iou=value('shadow.iou'),
                              min_score=value('shadow.min_score'))
    node.get_logger().info(
        f'shadow mode: candidate {candidate.model_name} ({candidate.model_version}), every '
        f'{settings.every_nth} frame(s), within {settings.cpu_share:.0%} of a core')
    # By name only when the label maps differ: COCO's repeats 'N/A', which names cannot map.
    label_map = (None if candidate.categories == deployed.categories
                 else label_mapping(candidate.categories, deployed.categories))
    return ShadowRunner(candidate, settings,
                        name=f'{candidate.model_name}:{candidate.model_version}',
                        label_map=label_map, logger=node.get_logger())
