"""Find the package's data files, in a source checkout or in an install's share directory."""
from __future__ import annotations

from pathlib import Path

PACKAGE = 'speculative_av'
_CHECKOUT = Path(__file__).resolve().parents[1]


def config_path(relative: str) -> Path:
    """
    Return the path of ``config/<relative>`` of this package.

    Run from a source checkout (``package.xml`` beside the Python package, as with ``PYTHONPATH``
    or ``colcon build --symlink-install``) that is the checkout's ``config`` directory; run from
    an install, the ``share/speculative_av/config`` directory found through the ament index.
    """
    if (_CHECKOUT / 'package.xml').is_file():
        return _CHECKOUT / 'config' / relative
    try:
        # Imported here: a source checkout needs no ament index.
        from ament_index_python.packages import get_package_share_directory
        share = get_package_share_directory(PACKAGE)
    except (ImportError, LookupError) as exc:
        raise FileNotFoundError(
            f'config/{relative}: not in a source checkout, and {PACKAGE} is not in the ament '
            f'index (source its install/setup.bash): {exc}') from exc
    return Path(share) / 'config' / relative
