"""``python -m ssf_deploy.tools`` (and ``torchrun ... -m ssf_deploy.tools train ...``)."""
import sys

try:
    from ssf_deploy_launcher import main
except ImportError:   # the package copied without its launcher
    from . import main

sys.exit(main())
