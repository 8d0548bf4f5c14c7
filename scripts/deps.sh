#!/usr/bin/env bash
# Idempotent installer for the Debian packages the project's scripts need.
#
#   source scripts/deps.sh; fabric_need_packages gcc make bc   # from another script
#   scripts/deps.sh gcc make bc                                 # directly
#
# Installs (apt-get, non-interactive) only the packages dpkg-query does not
# report as installed. `apt-get update` runs at most once per call, and only
# when the package lists are empty or the first install attempt fails.
# Needs root (CI runs as root) when something is actually missing.

fabric_need_packages() {
    local pkg status missing=()
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        if [[ "$status" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi

    echo "deps: installing missing packages: ${missing[*]}" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "deps: error: need root to install: ${missing[*]}" >&2
        return 1
    fi

    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -q -o Dpkg::Use-Pty=0 --no-install-recommends)
    local updated=0
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        echo "deps: apt package lists are empty, running apt-get update" >&2
        apt-get -q update >&2 || { echo "deps: error: apt-get update failed" >&2; return 1; }
        updated=1
    fi
    if ! "${apt[@]}" install "${missing[@]}" >&2; then
        if ((updated)); then
            echo "deps: error: apt-get install ${missing[*]} failed" >&2
            return 1
        fi
        echo "deps: install failed, running apt-get update and retrying" >&2
        apt-get -q update >&2 || { echo "deps: error: apt-get update failed" >&2; return 1; }
        "${apt[@]}" install "${missing[@]}" >&2 || {
            echo "deps: error: apt-get install ${missing[*]} failed" >&2
            return 1
        }
    fi
}

# Executed rather than sourced: install the packages named on the command line.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    if (($# == 0)); then
        echo "usage: $0 package..." >&2
        exit 2
    fi
    fabric_need_packages "$@"
fi
