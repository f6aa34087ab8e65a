"""``python -m ssf_deploy`` runs the CLI."""
from .tools import run_main

run_main()
