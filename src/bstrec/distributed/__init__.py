"""Scale-out: training under torchrun (DDP) and sample building partitioned by user on a
distributed engine."""
