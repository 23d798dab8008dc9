# Sourced by the checks that need Python packages: `python_venv NAME REQUIREMENT...` makes (on
# first use, or when the pins change) a virtualenv in ~/.cache/NAME holding those pinned
# requirements, and sets VENV to it.
python_venv() {
  local name=$1
  shift
  VENV="${XDG_CACHE_HOME:-$HOME/.cache}/$name"
  if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$*" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$@"
    echo "$*" >"$VENV/.pins"
  fi
}
