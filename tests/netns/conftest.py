"""Kernel-differential tests against a Linux NAT router in network namespaces."""
import os
import sys

# make `import kernel_router` work whatever pytest's import mode is
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "netns: builds a Linux kernel NAT router in network namespaces (needs root, nft, "
        "conntrack, ethtool; skipped with the reason otherwise)")
