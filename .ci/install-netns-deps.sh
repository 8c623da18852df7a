#!/bin/sh
# Install the host tools the kernel-router netns harness (tests/netns) needs.
# Idempotent: does nothing when nft, conntrack, ip, ethtool, curl and iperf3 are all present.
set -eu

missing=""
for cmd in nft conntrack ip ethtool curl iperf3; do
    if ! command -v "$cmd" >/dev/null 2>&1 \
       && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
        missing="$missing $cmd"
    fi
done

if [ -z "$missing" ]; then
    echo "install-netns-deps: nft, conntrack, ip, ethtool, curl and iperf3 already present"
    exit 0
fi

echo "install-netns-deps: missing:$missing"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-netns-deps: not root and no sudo; install nftables conntrack iproute2 ethtool curl iperf3" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends nftables conntrack iproute2 ethtool curl iperf3

for cmd in nft conntrack ip ethtool curl iperf3; do
    if ! command -v "$cmd" >/dev/null 2>&1 \
       && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
        echo "install-netns-deps: $cmd still missing after install" >&2
        exit 1
    fi
done
echo "install-netns-deps: done"
