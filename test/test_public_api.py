"""Parameters, config files, launch files and README agree: they are the public API."""
import ast
from pathlib import Path
import re

import pytest
import rclpy
from rclpy.parameter import Parameter
from speculative_av.ros.detector_node import SpeculativeDetector
import yaml

REPO = Path(__file__).resolve().parents[1]
ROS_BUILT_INS = {'use_sim_time', 'start_type_description_service'}  # every rclpy node has them


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


@pytest.fixture(scope='module')
def node():
    rclpy.init()
    node = SpeculativeDetector()  # declares parameters only; the model loads on configure
    yield node
    node.destroy_node()
    rclpy.shutdown()


def _declared(node) -> dict[str, str]:
    names = node.list_parameters([], 0).names
    return {n: node.describe_parameter(n).description for n in names if n not in ROS_BUILT_INS}


def test_every_parameter_has_a_description(node):
    assert all(_declared(node).values())


def test_vehicle_yaml_sets_exactly_the_declared_parameters_with_matching_types(node):
    config = yaml.safe_load((REPO / 'config' / 'vehicle.yaml').read_text())
    values = _flatten(config['speculative_detector']['ros__parameters'])
    assert set(values) == set(_declared(node))
    for name, value in values.items():
        assert type(node.get_parameter(name).value) is type(value), name


def test_readme_documents_every_parameter_and_executable(node):
    readme = (REPO / 'README.md').read_text()
    for name in _declared(node):
        assert f'| `{name}` |' in readme, f'README lacks a row for parameter {name}'
    setup = (REPO / 'setup.py').read_text()
    for executable in re.findall(r"'(\w+) = speculative_av", setup):
        assert f'| `{executable}` |' in readme, f'README lacks executable {executable}'


def test_deadline_can_be_changed_at_run_time_and_is_validated(node):
    assert node.set_parameters([Parameter('deadline_ms', value=80.0)])[0].successful
    assert node.settings.deadline.budget_ns == 80_000_000
    assert not node.set_parameters([Parameter('deadline_ms', value=-1.0)])[0].successful
    assert not node.set_parameters([Parameter('deadline_reference', value='soon')])[0].successful
    assert node.set_parameters([Parameter('deadline_reference', value='arrival')])[0].successful
    assert node.settings.deadline.budget_ns == 80_000_000


@pytest.mark.parametrize('name, value', [
    ('deadline_ms', float('inf')), ('deadline_ms', float('nan')), ('deadline_ms', 0.0),
    ('cloud.jpeg_quality', 0), ('cloud.jpeg_quality', 101), ('cloud.max_image_side', -1),
    ('deadline_ms', 'soon'), ('cloud.enabled', 'yes'), ('cloud.uplink', 'psychic')])
def test_hostile_parameter_values_are_refused_and_the_node_keeps_its_own(node, name, value):
    before = node.get_parameter(name).value
    try:
        result = node.set_parameters([Parameter(name, value=value)])[0]
    except Exception as error:  # rclpy raises for a wrong type; the service answers it
        assert 'type' in str(error).lower() or 'invalid' in str(error).lower(), error
    else:
        assert not result.successful
    assert node.get_parameter(name).value == before
    assert node.settings.deadline.budget_ns > 0


def _launch_arguments(source: str) -> tuple[set[str], set[str]]:
    """
    Return the launch argument names a launch file declares and the ones it reads.

    A name is a string literal, a module-level string constant, or (declared) a key of a
    module-level table the file declares arguments from.
    """
    tree = ast.parse(source)
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 for target in node.targets if isinstance(target, ast.Name)}
    tables = {key.value for node in tree.body
              if isinstance(node, (ast.Assign, ast.AnnAssign))
              and isinstance(node.value, ast.Dict)
              for key in node.value.keys if isinstance(key, ast.Constant)}

    def first_arguments(function: str) -> set[str]:
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == function and n.args]
        return ({c.args[0].value for c in calls if isinstance(c.args[0], ast.Constant)}
                | {constants[c.args[0].id] for c in calls
                   if isinstance(c.args[0], ast.Name) and c.args[0].id in constants})

    declared = first_arguments('DeclareLaunchArgument') | tables
    return declared, first_arguments('LaunchConfiguration')


LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))


@pytest.mark.parametrize('launch_file', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_reference_only_existing_things(launch_file):
    """Check statically what `ros2 launch` resolves (test_launch.py runs it where installed)."""
    setup = (REPO / 'setup.py').read_text()
    executables = set(re.findall(r"'(\w+) = speculative_av", setup))
    source = launch_file.read_text()
    assert 'def generate_launch_description' in source
    strings = {n.value for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    referenced = strings & {'speculative_detector', 'cloud_server', 'synthetic_camera'}
    assert referenced and referenced <= executables
    for name in re.findall(r"'config', '([\w.]+)'", source):
        assert (REPO / 'config' / name).is_file()
    declared, used = _launch_arguments(source)
    assert used <= declared, f'undeclared launch arguments {used - declared}'
    assert 'on_exit=_end_launch' in source, 'the launch must end, failing, with its process'


def test_vehicle_launch_types_its_overrides_as_the_node_declares_them(node):
    """Launch arguments are text; an untyped one reaches the node as the wrong type (issue 7)."""
    source = (REPO / 'launch' / 'vehicle.launch.py').read_text()
    table = next(n.value for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)
                 and isinstance(n.target, ast.Name) and n.target.id == 'SCALAR_OVERRIDES')
    assert isinstance(table, ast.Dict)
    overrides = {ast.literal_eval(row.elts[0]): row.elts[1].id for row in table.values
                 if isinstance(row, ast.Tuple) and isinstance(row.elts[1], ast.Name)}
    assert {'deadline_ms', 'local.model', 'local.weights'} <= set(overrides)
    python_type = {Parameter.Type.DOUBLE: 'float', Parameter.Type.STRING: 'str',
                   Parameter.Type.INTEGER: 'int', Parameter.Type.BOOL: 'bool'}
    for parameter, value_type in overrides.items():
        assert python_type.get(node.get_parameter(parameter).type_) == value_type, parameter
    assert node.get_parameter('cloud.endpoints').type_ == Parameter.Type.STRING_ARRAY
    assert re.search(r"overrides\['cloud\.endpoints'\] = ParameterValue\(.*?"
                     r'value_type=list\[str\]\)', source, re.S)


def test_readme_documents_every_launch_argument():
    readme = (REPO / 'README.md').read_text()
    section = readme[readme.index('## Launch files'):]
    section = section[:section.index('\n## ', 1)]
    for launch_file in LAUNCH_FILES:
        assert f'`{launch_file.name}`' in section
        for name in _launch_arguments(launch_file.read_text())[0]:
            assert f'| `{name}` |' in section, f'README lacks launch argument {name}'


def test_cloud_server_accepts_the_command_line_its_launch_file_builds():
    from speculative_av.cloud.server import parse_args
    source = (REPO / 'launch' / 'cloud_server.launch.py').read_text()
    argv = []
    for name, default in re.findall(r"^    '(\w+)': \('([^']*)'", source, re.M):
        argv += [f'--{name.replace("_", "-")}', default]
    assert len(argv) == 2 * 18
    parsed = parse_args(argv)  # argparse exits (failing the test) on an unknown option
    assert parsed.port == 50051 and parsed.model == 'fasterrcnn_mobilenet_v3_large_fpn'
