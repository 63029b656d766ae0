"""Training health: hung ranks (`watchdog`) and traces on demand (`profiling`)."""
