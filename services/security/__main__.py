from services import run
from services.security import SecurityService

run(SecurityService)
