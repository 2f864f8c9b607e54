#!/bin/sh
# Install the Debian packages kport needs, only those that are missing (fast when all are there).
# With --tests, also what the tests need beyond that: Debian's chromium, which the web UI's
# tests drive through Playwright.
set -eu
need=""
if [ "${1:-}" = "--tests" ]; then
    command -v chromium >/dev/null 2>&1 || need="$need chromium"
    # the fleet's tests start their own JetStream brokers on 127.0.0.1
    command -v nats-server >/dev/null 2>&1 || need="$need nats-server"
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need="$need python3-venv"
command -v python3 >/dev/null 2>&1 || need="$need python3"
for cmd in make gcc; do command -v "$cmd" >/dev/null 2>&1 || need="$need $cmd"; done
# the proc source's eBPF object: built by scripts/build-bpf.sh, loaded through libbpf.so.1
command -v clang >/dev/null 2>&1 || need="$need clang"
command -v llvm-strip >/dev/null 2>&1 || need="$need llvm"
command -v bpftool >/dev/null 2>&1 || need="$need bpftool"
[ -f /usr/include/bpf/bpf_helpers.h ] || need="$need libbpf-dev"
# the firewall's filter rules (iptables-nft, with the xtables NFQUEUE target)
command -v iptables-restore >/dev/null 2>&1 || need="$need iptables"
# the firewall tests make network namespaces of their own
command -v ip >/dev/null 2>&1 || need="$need iproute2"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "kport setup: missing Debian packages:$need (run as root, or install them)" >&2
        exit 1
    fi
    echo "kport setup: installing$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need
fi
# The groups the daemon's default port security names (members of kport may watch,
# members of kport-admin may decide).
if [ "$(id -u)" = 0 ]; then
    for group in kport kport-admin; do
        getent group "$group" >/dev/null 2>&1 || groupadd --system "$group"
    done
fi
