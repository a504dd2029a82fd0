"""Benchmark programs, run by `tinyserve bench NAME` (cli.py parses, runs and prints).

Each module has add_arguments(parser) and run(args) -> dict, the result that is printed as ONE
JSON object on the last stdout line; serve also has summary(result), a line for people.
"""
