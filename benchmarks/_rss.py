"""Peak resident memory of this process, in GB.

Read from /proc/self/status (VmHWM: the high-water mark of this process image). Not
getrusage().ru_maxrss: on Linux that survives fork + exec, so a child started by a parent that
held the benchmark data would report the parent's peak.
"""

import resource


def peak_rss_gb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # other platforms
