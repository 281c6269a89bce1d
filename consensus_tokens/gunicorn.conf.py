"""gunicorn settings for the web service: `gunicorn -c consensus_tokens/gunicorn.conf.py consensus_tokens.wsgi`.

Every value can be overridden from the environment (GUNICORN_*), or on the
command line. The defaults are what bench/ measured best on a 2-core machine:
the API's requests are short and mostly Python's work, so a few more sync
processes than cores keep both cores busy. Threaded workers (GUNICORN_WORKER_CLASS=
gthread, GUNICORN_THREADS) add group commit - the direct consumes that arrive
together in a process are written in one statement (metering/services/consume/
combiner.py) - but measured slower here, where Python is about three quarters of
a consume's CPU (bench/README.md); they pay where PostgreSQL is the larger part.
Each thread keeps its own database connection: workers x threads of them.
"""
import gc
import multiprocessing
import os
import shutil
import tempfile

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
# Keep-alive only matters to threaded workers (sync workers close after each response).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# Recycle workers now and then (with jitter, so they do not all restart at once).
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "100000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "10000"))
# Load the app before forking: workers share its memory and start at once. Each
# worker still opens its own database connection after the fork.
preload_app = os.environ.get("GUNICORN_PRELOAD", "true").lower() in ("1", "true", "yes")
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
# gunicorn answers a request line past this with an HTML 414 of its own. 8190 (its most) lets
# every URL up to the app's limit (request_limits.MAX_URL_BYTES, 4096) reach Django, which
# answers past that with a JSON 414 in the API's error shape.
limit_request_line = int(os.environ.get("GUNICORN_LIMIT_REQUEST_LINE", "8190"))
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# Prometheus: with several worker processes each writes its samples to files in
# this directory and a scrape of /metrics adds them up (consensus_tokens/metrics.py).
# It must be set before prometheus_client is imported, so here, not in Django.
_own_metrics_dir = None
if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ct-prometheus-")


def when_ready(server):
    # Everything loaded so far (Django, the app, its imports) lives as long as the
    # process: move it out of the garbage collector's sight, so the collections a
    # large request triggers (a 1,000-item batch) only walk what requests created.
    gc.freeze()


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
