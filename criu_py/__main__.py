# Lets `python -m criu_py` behave exactly like the criu-py console script.
from criu_py.main import main

main()
