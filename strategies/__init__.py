"""Flower strategies: FedAvg with seeded sampling, delta averaging, resume, masks."""
