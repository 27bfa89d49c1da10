"""`python -m proxy.simulator --port N`: the simulator alone (benchmarks)."""
from . import main

main()
