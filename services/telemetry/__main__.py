from services.telemetry._service import main

main()
