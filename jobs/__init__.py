"""raypress jobs: Ray pipelines, each runnable as `python -m jobs.NAME --help`."""
