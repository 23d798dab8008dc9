# Sourced by the scripts that run built binaries: sets TARGET_DIR to where cargo puts them,
# honouring CARGO_TARGET_DIR and .cargo/config (a hard-coded target/ breaks both).
TARGET_DIR=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export TARGET_DIR
