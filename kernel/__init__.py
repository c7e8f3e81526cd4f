"""The kernel: server, registry, supervisor (`llmos up`) and the `llmos` command line."""
