"""gunicorn hooks for the tests' servers: a dead worker's Prometheus files are marked
so a scrape stops counting its live gauges (counters are kept, as in production)."""
import os


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
