"""The pipeline's wiring (`pipeline`, `cluster`), its runners (`local`, `kfp_api`) and the CLI."""
