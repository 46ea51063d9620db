"""The sweep layer, above the stages: `plan` (nodes and keys), `resources` (what jobs ask of Ray),
`jobs` (one job's stage bodies in a Ray task), `driver` (run_sweep and its helpers) and
`results` (reading a sweep's outputs). Modules import what they use from the submodule that
defines it; this package re-exports nothing."""
