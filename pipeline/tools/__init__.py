"""Side tools that are not stages: training-throughput benchmarks (``pipeline bench-train``)."""
