"""``python -m ssf_deploy.tools`` (and ``torchrun ... -m ssf_deploy.tools train ...``)."""
from . import run_main

run_main()
