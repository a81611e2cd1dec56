"""The machine a benchmark ran on, and its figures: one JSON file and the README's tables."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
import platform
import subprocess
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def json_path() -> Path:
    """Return where the figures go: $BENCHMARK_JSON, else out/benchmark.json in the checkout."""
    return Path(os.environ.get('BENCHMARK_JSON', REPO / 'out' / 'benchmark.json'))


def _cpu_model() -> str:
    with open('/proc/cpuinfo') as cpuinfo:
        names = [line.split(':', 1)[1].strip() for line in cpuinfo
                 if line.startswith('model name')]
    return names[0] if names else platform.processor() or platform.machine()


def _ram_gb() -> float:
    with open('/proc/meminfo') as meminfo:
        kb = next(int(line.split()[1]) for line in meminfo if line.startswith('MemTotal'))
    return round(kb / 1024 ** 2, 1)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return 'not installed'


def _commit() -> str:
    result = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO,
                            capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


def machine() -> dict[str, Any]:
    """Describe this machine and software, and how busy it was when the run began."""
    import torch
    gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'commit': _commit(), 'cpu': _cpu_model(), 'cores': os.cpu_count(),
        'cores_usable': len(os.sched_getaffinity(0)), 'ram_gb': _ram_gb(), 'gpu': gpu,
        'python': platform.python_version(), 'torch': torch.__version__,
        'onnxruntime': _version('onnxruntime'), 'ros_distro': os.environ.get('ROS_DISTRO', ''),
        'load_average_1_5_15': [round(x, 2) for x in os.getloadavg()],
        'scale': float(os.environ.get('BENCHMARK_SCALE', '1')),
    }


def quantiles(values: np.ndarray) -> dict[str, float | int]:
    """Return count, p50, p99 and max of ``values`` (ms) rounded for reading."""
    if not len(values):
        return {'count': 0}
    return {'count': int(len(values)), 'p50_ms': round(float(np.median(values)), 2),
            'p99_ms': round(float(np.percentile(values, 99)), 2),
            'max_ms': round(float(values.max()), 2),
            'after_deadline': int((values > 0).sum())}


def _cell(value: Any, unit: str = '') -> str:
    return 'n/a' if value is None else f'{value}{unit}'


def tables(report: dict[str, Any]) -> str:
    """Return the README's markdown tables for the sections ``report`` holds."""
    m = report['machine']
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
             f"{m['ram_gb']} GB RAM, GPU {m['gpu']}; Python {m['python']}, torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}; {m['date']}, commit {m['commit']}, load average "
             f"at start {m['load_average_1_5_15']}, scale {m['scale']}", '']
    if 'overhead' in report:
        lines += ['| camera | node overhead p50 / p95 / p99 ms | frames processed / received '
                  '| dropped | node CPU ms per frame |', '|---|---|---|---|---|']
        for row in report['overhead']:
            p99 = _cell(row['p99_ms']) + ('' if row['p99_from_node'] else ' (*)')
            lines.append(f"| {row['resolution']} at {row['rate_hz']:g} Hz | {row['p50_ms']} / "
                         f"{row['p95_ms']} / {p99} | {row['processed']} / {row['received']} | "
                         f"{row['dropped']} | {row['cpu_ms_per_frame']} |")
        if not all(row['p99_from_node'] for row in report['overhead']):
            lines.append('\n(*) the node does not report `node_overhead_ms_p99` on /diagnostics '
                         'in this build; no outside measurement separates its inference time.')
        lines.append('')
    if 'lateness' in report:
        lines += ['| cloud | fused results | at the receiver after the deadline p50 / p99 / '
                  'max ms | after the deadline | winners |', '|---|---|---|---|---|']
        for row in report['lateness']:
            winners = ', '.join(f'{k} {v}' for k, v in sorted(row['winners'].items()))
            lines.append(f"| {row['cloud']} | {row['count']} | {row.get('p50_ms')} / "
                         f"{row.get('p99_ms')} / {row.get('max_ms')} | "
                         f"{row.get('after_deadline')} | {winners} |")
        lines.append('')
    if 'camera_rate' in report:
        lines += ['| local.backend | highest rate without drops | steps: Hz (sent / received / '
                  'processed / dropped; node CPU ms per frame) |', '|---|---|---|']
        for row in report['camera_rate']:
            steps = '; '.join(f"{s['rate_hz']:g} ({s['sent']} / {s['received']} / "
                              f"{s['processed']} / {s['dropped']}; {s['cpu_ms_per_frame']})"
                              for s in row['steps'])
            lines.append(f"| {row['backend']} | {_cell(row['highest_rate_hz'], ' Hz')} | "
                         f'{steps} |')
        lines.append('')
    if 'rss' in report:
        r = report['rss']
        lines += ['| run | RSS start / end / max MB | growth MB per minute | node CPU ms per '
                  'frame | frames processed |', '|---|---|---|---|---|',
                  f"| {r['duration_s'] / 60:.1f} min, {r['run']} | {r['start_mb']} / "
                  f"{r['end_mb']} / {r['max_mb']} | {r['growth_mb_per_min']} | "
                  f"{r['cpu_ms_per_frame']} | {r['processed']} |", '']
    return '\n'.join(lines)


def write(report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON where :func:`json_path` says; return the path."""
    path = json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + '\n')
    return path
