"""Benchmarks that print a table and ratios (`python -m experiments bench fisher | round | data | grid`), one
module each: fisher, round (and its --profile), stock (round --against stock), grid, data; timing holds what they
share. Numbers are recorded in results/benchmarks.md."""
