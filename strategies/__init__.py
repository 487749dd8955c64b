"""The federated methods, one file each with its client hook, server hook and the keys it reads, registered under
run-config client-algorithm: method (the contract; FedAvg with FedProx's term), scaffold (SCAFFOLD). Beside
them: fedavg (SeededFedAvg, the server's rounds every method builds on: seeded sampling, aggregation summed as
replies come) and server_opt (FedAvgM, FedAdam, FedYogi, FedAdagrad, under server-optimizer)."""
