#!/usr/bin/env bash
# Runs once, when the postgres container starts on an empty data volume (docker-entrypoint-initdb.d):
# two databases, each owned by its own login role, so MLflow and the prefixd job store cannot
# touch each other's tables. Passwords come from the environment (docker/.env), never from files.
# To change a password later: ALTER ROLE ... PASSWORD ... (this script does not run again).
# No `set -e` etc.: the image sources this file instead of running it if it lost its exec bit.
: "${PREFIXD_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}"

# psql variables (:'name') quote the values, so a password cannot break out of the statement.
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v prefixd_pw="$PREFIXD_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefixd LOGIN PASSWORD :'prefixd_pw';
CREATE DATABASE prefixd OWNER prefixd;
REVOKE ALL ON DATABASE prefixd FROM PUBLIC;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
