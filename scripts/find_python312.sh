#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (jax >= 0.11 needs it), or fails with a hint.
set -u
for candidate in python3.13 python3.12; do
  if path=$(command -v "$candidate") && "$path" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
    echo "$path"; exit 0
  fi
done
# pyenv installs versions that its shims hide unless selected.
for path in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9] /usr/local/bin/python3.12 /usr/bin/python3.12; do
  if [ -x "$path" ]; then echo "$path"; exit 0; fi
done
echo "error: no Python >= 3.12 found; install python3.12 (jax >= 0.11 needs it)" >&2
exit 1
