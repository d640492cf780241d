"""``python -m pladis.bench.child ARGS``: run ``pladis ARGS``; print this process's peak RSS as JSON last.

The peak is VmHWM from /proc/self/status, which belongs to this program's own address space; getrusage's
ru_maxrss would also count the parent's memory copied at fork, before exec.
"""

import json
import sys
from pathlib import Path

from pladis import cli


def peak_rss_gib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return None


if __name__ == "__main__":
    code = cli.main(sys.argv[1:])
    print(json.dumps({"returncode": code, "peak_rss_gib": peak_rss_gib()}))
    sys.exit(code)
