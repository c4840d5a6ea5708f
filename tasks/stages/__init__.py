"""The DVC stages, one module each: `tasks.stages.<stage>.<stage>(cfg, domain, paths)`, found by
`tasks.cli.run_stage`; the helpers they share live beside this package in `tasks/`."""
