"""The hardware service: what the host has (CPU, memory, GPUs, the stack's processes) and
who has reserved which memory.

    server.py      HardwareService over gRPC: Snapshot, Watch, Reserve, Release
    checks.py      request checks (pure): devices, bytes, TTLs, holders, Watch intervals
    ledger.py      reservation accounting (pure): fit, renew, release, expiry, orphans
    host.py        CPU and memory through psutil
    processes.py   the registered services' processes, and whether a holder's still runs
    nvml.py        GPUs through NVML, or why there are none
    registered.py  the kernel's list of services (names and pids)
"""
