"""`python -m ray_jobs.cli ...`, as Ray Jobs run the CLI (ray_jobs/cluster/submit.py)."""

from ray_jobs.cli import main

main()
