"""Match stage: candidate generation (two-tower, item-to-item, popularity), merge, indexes."""
