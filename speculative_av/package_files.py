"""Find the package's data files, in a source checkout or in an install's share directory."""
from __future__ import annotations

from pathlib import Path

PACKAGE = 'speculative_av'
_CHECKOUT = Path(__file__).resolve().parents[1]


def package_path(relative: str) -> Path:
    """
    Return the path of ``<relative>`` (e.g. ``config/vehicle.yaml``) of this package.

    Run from a source checkout (``package.xml`` beside the Python package, as with ``PYTHONPATH``
    or ``colcon build --symlink-install``) that is inside the checkout; run from an install, inside
    the ``share/speculative_av`` directory found through the ament index.
    """
    if (_CHECKOUT / 'package.xml').is_file():
        return _CHECKOUT / relative
    try:
        # Imported here: a source checkout needs no ament index.
        from ament_index_python.packages import get_package_share_directory
        share = get_package_share_directory(PACKAGE)
    except (ImportError, LookupError) as exc:
        raise FileNotFoundError(
            f'{relative}: not in a source checkout, and {PACKAGE} is not in the ament index '
            f'(source its install/setup.bash): {exc}') from exc
    return Path(share) / relative


def config_path(relative: str) -> Path:
    """Return the path of ``config/<relative>``."""
    return package_path(f'config/{relative}')


def model_path(name: str) -> Path:
    """Return the path of the shipped checkpoint ``models/<name>``."""
    return package_path(f'models/{name}')
