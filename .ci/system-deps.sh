#!/usr/bin/env bash
# Installs the system packages Keycell needs, when they are missing:
#   softhsm2    - the PKCS#11 token the key-custody tests run against
#   postgresql  - the database whose credentials the rotation tests manage
#   iproute2    - `ip netns` and veth links: the partition harness (keycell/testing/netns.py);
#                 not in Debian's slim images
#   wrk         - with --bench only: the HTTP load generator of bench/api.py
#   swtpm, libtss2-dev - the software TPM and the TSS headers tpm2-pytss builds against
#                 (TPM node attestation tests)
# As root it installs them with apt-get; otherwise it names what to install and fails.
set -euo pipefail

missing=()
[[ -e /usr/lib/softhsm/libsofthsm2.so ]] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v swtpm >/dev/null || missing+=(swtpm)
command -v ip >/dev/null || [[ -x /usr/sbin/ip ]] || missing+=(iproute2)
pkg-config --exists tss2-esys 2>/dev/null || missing+=(libtss2-dev pkg-config)
if [[ ${1:-} == "--bench" ]]; then
    command -v wrk >/dev/null || missing+=(wrk)
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "Keycell needs these Debian packages: ${missing[*]}" >&2
    echo "Install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
