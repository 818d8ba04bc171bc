import sys

if sys.argv[1:] == ["--warm"]:  # (make's install step: compile the ops into numba's cache)
    from drivers.accel._warm import main as warm

    sys.exit(warm())

from drivers.accel._driver import main

main()
