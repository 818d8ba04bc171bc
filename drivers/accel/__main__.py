from drivers.accel._driver import main

main()
