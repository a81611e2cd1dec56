"""ament_python build of speculative_av; executables land in lib/speculative_av/."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'speculative_av'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.*')),
        (f'share/{PACKAGE}/config/traces', glob('config/traces/*.csv')),
        (f'share/{PACKAGE}/models', glob('models/*.pt') + glob('models/*.md')),
        (f'share/{PACKAGE}/protos', glob('protos/*.proto')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='speculative_av developers',
    maintainer_email='speculative-av@example.org',
    description='Speculative cloud execution for ROS 2 camera perception.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'speculative_detector = speculative_av.ros.detector_node:main',
            'cloud_server = speculative_av.cloud.server:main',
            'snippet_collector = speculative_av.cloud.collector:main',
            'triton_server = speculative_av.cloud.triton_server:main',
            'synthetic_camera = speculative_av.ros.synthetic_camera:main',
            'replay = speculative_av.tools.replay:main',
            'record = speculative_av.tools.record:main',
            'network_relay = speculative_av.netem.relay:main',
            'train = speculative_av.tools.train:main',
            'make_recording = speculative_av.tools.make_recording:main',
            'evaluate = speculative_av.tools.evaluate:main',
            'gate = speculative_av.tools.gate:main',
            'fleet_load = speculative_av.tools.fleet_load:main',
            'demo = speculative_av.tools.demo:main',
            'model_release = speculative_av.tools.model_release:main',
            'curate = speculative_av.tools.curate:main',
            'data_engine = speculative_av.tools.data_engine:main',
        ],
    },
)
