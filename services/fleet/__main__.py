from services.fleet._service import main

main()
