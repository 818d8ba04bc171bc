from services.scheduler._service import main

main()
