#!/usr/bin/env bash
# Installs the system packages `make bench` uses (never the tests), when missing:
#   wrk - the HTTP load generator bench/api.py drives Keycell and OpenBao with
# As root it installs them with apt-get; otherwise it names what to install and fails.
set -euo pipefail

missing=()
command -v wrk >/dev/null || missing+=(wrk)

if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "Keycell's benchmarks need these Debian packages: ${missing[*]}" >&2
    echo "Install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
