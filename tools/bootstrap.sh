#!/usr/bin/env bash
# Creates or refreshes the project's one virtual environment, idempotently.
#
# The venv lives outside the clone (default ~/.cache/speculative_av/venv, override with
# SPECULATIVE_AV_VENV) so every clone on a machine, CI's included, shares one 6 GB install.
# A stamp holds the hash of everything that shapes the venv; when it matches, this exits at once.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SPECULATIVE_AV_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/speculative_av/venv}
python=${SPECULATIVE_AV_PYTHON:-python3}
lock=$repo/tools/requirements.lock
shim=$repo/tools/vision_msgs
stamp=$venv/.speculative_av-stamp

# A Python from another ROS-wheels venv exports this guard; inheriting it breaks ours.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

wanted=$(cat "$lock" "${BASH_SOURCE[0]}" "$shim"/CMakeLists.txt "$shim"/package.xml "$shim"/msg/*.msg \
  | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  exit 0
fi

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # a concurrent bootstrap of the same venv waits here, then finds the stamp
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  exit 0
fi

log() { printf '[bootstrap] %s\n' "$*"; }
started=$SECONDS

if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: the ros-kilted-* wheels are cp311; $python is $("$python" --version 2>&1)." >&2
  echo "           Set SPECULATIVE_AV_PYTHON to a Python 3.11 interpreter." >&2
  exit 1
fi
if [[ ! -x $venv/bin/python ]]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
rm -f "$stamp"

log "installing $(grep -c '==' "$lock") pinned packages from tools/requirements.lock (first time: ~2 min)"
"$venv/bin/python" -m pip install -qq --disable-pip-version-check --no-deps -r "$lock"

# The wheels' exported CMake files name the manylinux build interpreter's include dirs.
py_include=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_include=$("$venv/bin/python" -c 'import numpy; print(numpy.get_include())')
{ grep -rlZ --include='*.cmake' /opt/python/cp311-cp311 "$venv/share" || true; } \
  | xargs -0 -r sed -i \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_include#g" \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$py_include#g"

distro_has_vision_msgs() {
  local prefix
  IFS=: read -ra prefixes <<<"${AMENT_PREFIX_PATH:-}"
  for prefix in "${prefixes[@]}"; do
    [[ -n $prefix && $prefix != "$venv" && -f $prefix/share/vision_msgs/package.xml ]] && return 0
  done
  return 1
}
if distro_has_vision_msgs; then
  log "vision_msgs comes from the sourced ROS distribution; not building the shim"
else
  log "building the vision_msgs interface shim into the venv"
  build=$venv/build/vision_msgs
  rm -rf "$build" && mkdir -p "$build"
  PATH=$venv/bin:$PATH "$venv/bin/cmake" -S "$shim" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$venv/bin/python" \
    -DBUILD_TESTING=OFF >"$build.log" 2>&1 \
    && PATH=$venv/bin:$PATH "$venv/bin/cmake" --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
    && "$venv/bin/cmake" --install "$build" >>"$build.log" 2>&1 \
    || { echo "bootstrap: building vision_msgs failed; see $build.log" >&2; tail -20 "$build.log" >&2; exit 1; }
fi

"$venv/bin/python" -c 'import rclpy, vision_msgs.msg, torch, torchvision, grpc, cv2' \
  || { echo "bootstrap: the environment does not import; see the errors above" >&2; exit 1; }
echo "$wanted" >"$stamp"
log "environment ready in $((SECONDS - started)) s: $venv"
