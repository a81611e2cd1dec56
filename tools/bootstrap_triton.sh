#!/usr/bin/env bash
# Creates or refreshes the Triton environment (nvidia-pytriton), idempotently.
#
# pytriton pins numpy<2 and protobuf 6, the main venv has numpy 2 and protobuf 7: a second venv,
# default ~/.cache/speculative_av/triton-venv (override with SPECULATIVE_AV_TRITON_VENV). It must
# come from Debian's /usr/bin/python3.11: Triton's Python-backend stub links the system
# libpython3.11 (override with SPECULATIVE_AV_TRITON_PYTHON). torch and torchvision (5.5 GB) are
# not installed twice: a .pth file appends the main venv's site-packages AFTER this venv's own, so
# numpy 1.26, protobuf 6 and the numpy-1 builds of OpenCV and simplejpeg here win, and only what
# is missing here (torch, torchvision, Pillow, ...) comes from the main venv. A stamp holds the hash
# of what shapes the venv; when it matches, this exits at once.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/speculative_av
venv=${SPECULATIVE_AV_TRITON_VENV:-$cache/triton-venv}
main_venv=${SPECULATIVE_AV_VENV:-$cache/venv}
python=${SPECULATIVE_AV_TRITON_PYTHON:-/usr/bin/python3.11}
lock=$repo/tools/triton-requirements.lock
stamp=$venv/.speculative_av-stamp

unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

wanted=$( { cat "$lock" "${BASH_SOURCE[0]}"; echo "$main_venv"; } | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # a concurrent bootstrap of the same venv waits here, then finds the stamp
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  exit 0
fi

log() { printf '[bootstrap-triton] %s\n' "$*"; }
started=$SECONDS

if [[ ! -x $python ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap-triton: $python is not a Python 3.11; Triton's backend stub needs the system" >&2
  echo "                  libpython3.11 (Debian: apt-get install python3.11-venv libpython3.11)." >&2
  exit 1
fi
main_site=$("$main_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -d $main_site/torch ]]; then
  echo "bootstrap-triton: no torch in the main venv ($main_site); run 'make env' first" >&2
  exit 1
fi
if [[ ! -x $venv/bin/python ]]; then
  log "creating virtual environment $venv from $python"
  "$python" -m venv "$venv"
fi
rm -f "$stamp"

log "installing $(grep -c '==' "$lock") pinned packages from tools/triton-requirements.lock"
"$venv/bin/python" -m pip install -qq --disable-pip-version-check --no-deps -r "$lock"

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A plain path line: the main venv's own .pth files (the ROS wheels' re-exec hook) stay unrun.
echo "$main_site" >"$site/zz_speculative_av_main_venv.pth"

# Every package must come from where it is meant to: numpy-1 builds here, torch from the main venv.
PYTHONPATH=$repo "$venv/bin/python" - "$venv" "$main_venv" <<'EOF'
import sys
venv, main_venv = sys.argv[1:]
import cv2, numpy, pytriton, simplejpeg, torch, torchvision, tritonclient.grpc  # noqa: E401
from speculative_av.core import image_decoding  # noqa: F401
from speculative_av.detectors import torchvision_detector  # noqa: F401
for module, home in ((numpy, venv), (cv2, venv), (simplejpeg, venv), (pytriton, venv),
                     (torch, main_venv), (torchvision, main_venv)):
    if not module.__file__.startswith(home + '/'):
        sys.exit(f'{module.__name__} comes from {module.__file__}, expected under {home}')
if not numpy.__version__.startswith('1.'):
    sys.exit(f'numpy {numpy.__version__}: pytriton needs numpy<2')
rgb = numpy.zeros((8, 8, 3), numpy.uint8)
decoded = image_decoding.decode_rgb(simplejpeg.encode_jpeg(rgb), 'jpeg')
torch.from_numpy(decoded).float().sum()
EOF
echo "$wanted" >"$stamp"
log "environment ready in $((SECONDS - started)) s: $venv ($(du -sh "$venv" | cut -f1))"
