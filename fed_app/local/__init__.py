"""Flower's processes on this machine, started and stopped here.

local_federation (a private Flower federation: own FLWR_HOME and ports, `flwr run`, a stop of exactly its
processes), session (one simulation that runs a slot's runs in turn).
"""
