from drivers.sensors._driver import main

main()
