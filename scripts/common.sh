# shellcheck shell=bash
# Shared helpers for scripts/test, scripts/demo and .ci/run (sourced, not executed).
# Owns: the root check, installing the lab's Debian packages when missing, finding cargo
# (also under sudo), and removing lab namespaces left by killed runs.

# Tools the lab needs, as "tool:debian-package".
POSTERN_LAB_TOOLS=(ip:iproute2 ss:iproute2 nft:nftables conntrack:conntrack)
# Tools only the tests need (tests/tests/darkness_e2e.rs scans the lab with nmap;
# tests/tests/connect_e2e.rs starts its own sshd inside the gateway namespace and runs ssh).
POSTERN_TEST_TOOLS=(nmap:nmap sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (e.g. \`sudo $0\`): the lab creates network namespaces and nftables tables"
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# ensure_tools TOOL:PACKAGE...  installs the packages of missing tools (apt-get, non-interactive).
ensure_tools() {
    local missing=() entry tool pkg
    for entry in "$@"; do
        tool=${entry%%:*}
        pkg=${entry#*:}
        have "$tool" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing[*]} and no apt-get: install them by hand"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    # Packages such as openssh-server start their daemon on install. The tests start their
    # own (inside a lab namespace) and must not depend on, or leave behind, one in the root
    # namespace: a temporary policy-rc.d (exit 101 = "action forbidden", honoured by
    # invoke-rc.d and deb-systemd-invoke) keeps every service from starting during install.
    local policy=/usr/sbin/policy-rc.d ours=0 status=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# postern scripts/common.sh: no service starts during install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null || status=$?
    if [ "$ours" -eq 1 ]; then
        rm -f "$policy"
    fi
    [ "$status" -eq 0 ] || die "apt-get install ${missing[*]} failed (exit $status)"
}

# find_cargo: makes `cargo` callable, also under sudo (whose PATH lacks ~/.cargo/bin).
find_cargo() {
    export PATH="$PATH:/usr/sbin:/sbin"
    if command -v cargo >/dev/null 2>&1; then
        return 0
    fi
    local home
    for home in "${CARGO_HOME:-}" "$HOME/.cargo" \
        "$( [ -n "${SUDO_USER:-}" ] && getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH"
            # rustup's proxies need the toolchains of the user who installed them.
            if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$(dirname "$home")/.rustup" ]; then
                export RUSTUP_HOME="$(dirname "$home")/.rustup"
            fi
            export CARGO_HOME="$home"
            return 0
        fi
    done
    die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
}

# Deletes lab namespaces (pst-<pid>-... and pst-demo-<pid>-...) whose creating process is
# gone, e.g. after a run was killed with SIGKILL. Never touches other namespaces.
cleanup_stale_namespaces() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        if [[ $ns =~ ^pst-(demo-)?([0-9]+)-.*$ ]]; then
            pid=${BASH_REMATCH[2]}
            if ! kill -0 "$pid" 2>/dev/null; then
                ip netns del "$ns" 2>/dev/null || true
            fi
        fi
    done
}
