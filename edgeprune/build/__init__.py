"""What the build host runs, with torch: loading, calibration, pruning, conversion glue, streaming, planning, mixed precision, the export pipeline, builds, the host probe, the benches."""
