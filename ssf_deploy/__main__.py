"""``python -m ssf_deploy`` runs the CLI, through the same launcher as the console script (a
Ctrl-C while the package imports is one line; see :mod:`ssf_deploy_launcher`)."""
import sys

try:
    from ssf_deploy_launcher import main
except ImportError:   # the package copied without its launcher
    from .tools import main

sys.exit(main())
