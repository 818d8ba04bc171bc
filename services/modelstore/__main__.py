from services import run
from services.modelstore._service import ModelStoreService

run(ModelStoreService)
