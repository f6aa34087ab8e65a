"""Subprocess entry of the benchmark (see :mod:`ssf_deploy.bench.isolate`)."""
import sys

from .isolate import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
