from services.scheduler._scheduler import main

main()
