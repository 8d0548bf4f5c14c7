#!/usr/bin/env bash
# Idempotent installer for the Debian packages the project's scripts need,
# and for the pinned Python packages some tests drive servers with.
#
#   source scripts/deps.sh; fabric_need_packages gcc make bc   # from another script
#   scripts/deps.sh gcc make bc                                 # directly
#   scripts/deps.sh --pip tests/grpc_clients/requirements.txt   # Python packages
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

# Installs, with `python3 -m pip`, the `name==version` lines of a requirements
# file that python3 does not already have at that version (other lines and
# comments are ignored). Installs python3-pip first if pip is missing.
fabric_need_python_requirements() {
    local file=$1 line name version have missing=()
    [[ -r "$file" ]] || { echo "deps: error: cannot read $file" >&2; return 1; }
    if ! command -v python3 >/dev/null; then
        fabric_need_packages python3 || return 1
    fi
    while IFS= read -r line; do
        line=${line%%#*}
        line=${line//[[:space:]]/}
        [[ "$line" == *==* ]] || continue
        name=${line%%==*}
        version=${line#*==}
        have=$(python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
            "$name" 2>/dev/null || true)
        if [[ "$have" != "$version" ]]; then
            missing+=("$name==$version")
        fi
    done <"$file"
    if ((${#missing[@]} == 0)); then
        return 0
    fi

    echo "deps: installing missing Python packages (from $file): ${missing[*]}" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        fabric_need_packages python3-pip || return 1
    fi
    local pip=(python3 -m pip install --quiet --disable-pip-version-check)
    # A Debian python3 refuses to install into itself (PEP 668) unless told to;
    # these packages are test tools, pinned, and nothing of Debian's uses them.
    if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        pip+=(--break-system-packages)
    fi
    "${pip[@]}" "${missing[@]}" >&2 || {
        echo "deps: error: pip install ${missing[*]} failed" >&2
        return 1
    }
}

# Executed rather than sourced: install the packages named on the command line.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    if (($# == 0)); then
        echo "usage: $0 package... | $0 --pip requirements.txt" >&2
        exit 2
    fi
    if [[ "$1" == --pip ]]; then
        (($# == 2)) || { echo "usage: $0 --pip requirements.txt" >&2; exit 2; }
        fabric_need_python_requirements "$2"
    else
        fabric_need_packages "$@"
    fi
fi
