# Fixtures shared across test files. Importing a fixture here registers it for every test under tests/.
from pg import fresh_postgres_url, postgres_server, postgres_url  # noqa: F401
