# Fixtures shared across test files. Importing a fixture here registers it for every test under tests/.
from mlflow_server import mlflow_server, mlflow_server_uri  # noqa: F401
from pg import fresh_postgres_url, postgres_server, postgres_url  # noqa: F401
from smollm2 import smollm2  # noqa: E402,F401
