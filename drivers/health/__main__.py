from drivers.health._driver import main

main()
